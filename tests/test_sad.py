"""SAD and PolicyDb: SPI lookup, outbound SA resolution, inbound selector check (RFC 4301 5.2),
and the query interface of the draft (sections 4.3.2 and 4.4.2)."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

import pytest

from bits.constants import Action, AuthAlg, Direction, EncAlg, Mode
from bits.errors import ConfigError
from bits.ip import PacketSelectors
from bits.sa import SaParams
from bits.sad import PolicyDb, Sad, sa_serves
from bits.spd import AddressRange, IcmpRange, Level, Spd, SpdEntry, TrafficSelector

OUT, IN = Direction.OUT, Direction.IN
UDP, ICMPV6, MH = 17, 58, 135
HOA, HA, CN, COA = "2001:db8:1::100", "2001:db8:1::1", "2001:db8:9::9", "2001:db8:f::100"
KEY = bytes(range(36))


@dataclass(eq=False)
class FakeSa:
    """Stands in for bits.esp.SecurityAssociation: the SAD only needs ``.params``."""

    params: SaParams


def A(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def sa(spi: int, src: str, dst: str, direction: Direction, mode: Mode = Mode.TRANSPORT, reqid: int | None = None) -> FakeSa:
    return FakeSa(
        SaParams(spi, A(src), A(dst), direction, mode, EncAlg.AES_GCM_16, KEY, reqid=reqid)
    )


def pkt(src: str, dst: str, proto: int = UDP, **kw: int | None) -> PacketSelectors:
    return PacketSelectors(A(src).version, int(A(src)), int(A(dst)), proto, **kw)


def ts(local: str, remote: str, proto: int | None = None, **kw) -> TrafficSelector:
    return TrafficSelector(AddressRange.parse(local), AddressRange.parse(remote), proto, **kw)


def protect(name: str, direction: Direction, sel: TrafficSelector, mode: Mode = Mode.TRANSPORT, **kw) -> SpdEntry:
    return SpdEntry(name, direction, sel, Action.PROTECT, mode, **kw)


# --- Sad -----------------------------------------------------------------------------------------------


def test_inbound_lookup_by_spi_alone() -> None:
    sa_in = sa(0x1001, HA, HOA, IN)
    sad = Sad([sa_in, sa(0x1002, HOA, HA, OUT)])
    assert sad.get_inbound(0x1001) is sa_in
    assert sad.get_inbound(0x1001, dst=int(A(COA))) is sa_in  # RFC 4301 4.1: SPI alone for unicast
    assert sad.get_inbound(0x1002) is None  # an outbound SA is never found inbound
    assert sad.get_inbound(0x9999) is None


def test_shared_inbound_spi_is_told_apart_by_destination() -> None:
    a, b = sa(0x2000, HA, HOA, IN), sa(0x2000, HA, COA, IN)
    sad = Sad([a, b])
    assert sad.get_inbound(0x2000) is None  # ambiguous without the destination
    assert sad.get_inbound(0x2000, int(A(HOA))) is a
    assert sad.get_inbound(0x2000, int(A(COA))) is b
    assert sad.get_inbound(0x2000, int(A(CN))) is None


def test_duplicate_spi_and_destination_is_refused() -> None:
    sad = Sad([sa(0x3000, HA, HOA, IN)])
    with pytest.raises(ConfigError, match="duplicate SPI 0x00003000"):
        sad.add(sa(0x3000, CN, HOA, IN))
    sad.add(sa(0x3000, HOA, HA, OUT))  # other direction: fine
    sad.add(sa(0x3000, HOA, CN, OUT))  # peers pick SPIs independently: fine
    assert len(sad) == 3
    assert sad.get_outbound(0x3000, A(CN)).params.dst == A(CN)
    assert sad.get_outbound(0x3000).params.dst == A(CN)  # newest


def test_remove_replace_and_generation() -> None:
    old = sa(0x4000, HA, HOA, OUT, Mode.TUNNEL)
    sad = Sad([old])
    g = sad.generation
    moved = sa(0x4000, HA, COA, OUT, Mode.TUNNEL)  # RFC 3776 4.1: HA moves the SA to the new CoA
    sad.replace(old, moved)
    assert list(sad) == [moved] and sad.generation > g
    assert sad.outbound_by_addresses(Mode.TUNNEL, 6, int(A(HA)), int(A(COA))) is moved
    assert sad.outbound_by_addresses(Mode.TUNNEL, 6, int(A(HA)), int(A(HOA))) is None
    sad.remove(moved)
    assert len(sad) == 0
    with pytest.raises(ConfigError, match="not in the SAD"):
        sad.remove(moved)
    with pytest.raises(ConfigError, match="not in the SAD"):
        sad.replace(old, moved)


def test_find_inbound_outbound_and_clear() -> None:
    a, b = sa(0x5000, HA, HOA, IN), sa(0x5000, HOA, HA, OUT)
    sad = Sad([a, b])
    assert sad.find(0x5000) == [a, b] and sad.find(0x5000, OUT) == [b]
    assert sad.inbound() == (a,) and sad.outbound() == (b,)
    sad.clear()
    assert len(sad) == 0 and sad.get_inbound(0x5000) is None


# --- outbound resolution ---------------------------------------------------------------------------------


def test_resolution_by_reqid_prefers_the_newest_sa_of_the_right_mode() -> None:
    old, new = sa(0x6001, HOA, HA, OUT, reqid=3), sa(0x6002, HOA, HA, OUT, reqid=3)
    tunnel = sa(0x6003, COA, HA, OUT, Mode.TUNNEL, reqid=3)
    entry = protect("bu", OUT, ts(HOA, HA, MH, mh_type=5), reqid=3, level=Level.UNIQUE)
    pdb = PolicyDb(Spd([entry]), Sad([old, new, tunnel]))
    assert pdb.resolve_outbound(entry, pkt(HOA, HA, MH, mh_type=5)) is new
    # the reqid binds even when the addresses differ (the SA is the one the policy names)
    other = protect("x", OUT, ts("any6", "any6"), reqid=9)
    assert pdb.resolve_outbound(other, pkt(HOA, HA)) is None


def test_resolution_by_tunnel_endpoints() -> None:
    t = sa(0x7001, COA, HA, OUT, Mode.TUNNEL)
    entry = protect("payload", OUT, ts(HOA, "any6"), Mode.TUNNEL, tunnel_src=A(COA), tunnel_dst=A(HA))
    pdb = PolicyDb(Spd([entry]), Sad([sa(0x7002, HA, COA, IN, Mode.TUNNEL), t]))
    assert pdb.resolve_outbound(entry, pkt(HOA, CN)) is t
    assert pdb.resolve_outbound(entry, pkt(HOA, "2001:db8:9::77")) is t


def test_resolution_by_packet_addresses_in_transport_mode() -> None:
    to_cn, to_ha = sa(0x8001, HOA, CN, OUT), sa(0x8002, HOA, HA, OUT)
    entry = protect("host", OUT, ts(HOA, "any6"))
    pdb = PolicyDb(Spd([entry]), Sad([to_cn, to_ha, sa(0x8003, HOA, HA, OUT, Mode.TUNNEL)]))
    assert pdb.resolve_outbound(entry, pkt(HOA, CN)) is to_cn
    assert pdb.resolve_outbound(entry, pkt(HOA, HA)) is to_ha
    assert pdb.resolve_outbound(entry, pkt(HOA, "2001:db8:9::77")) is None


def test_resolution_by_spi() -> None:
    s = sa(0x8101, HOA, HA, OUT)
    entry = protect("pinned", OUT, ts(HOA, HA), spi=0x8101)
    wrong_mode = protect("pinned-tunnel", OUT, ts(HOA, HA), Mode.TUNNEL, tunnel_src=A(HOA), tunnel_dst=A(HA), spi=0x8101)
    pdb = PolicyDb(Spd([entry]), Sad([sa(0x8102, HOA, HA, OUT), s]))
    assert pdb.resolve_outbound(entry, pkt(HOA, HA)) is s
    assert pdb.resolve_outbound(wrong_mode, pkt(HOA, HA)) is None


def test_lookup_outbound_caches_per_flow_and_flushes_on_changes() -> None:
    entry = protect("host", OUT, ts(HOA, "any6"))
    spd, sad = Spd([entry]), Sad()
    pdb = PolicyDb(spd, sad)
    p = pkt(HOA, CN, UDP, sport=1, dport=2)
    assert pdb.lookup_outbound(p) == (entry, None)  # PROTECT but no SA yet
    s = sa(0x9001, HOA, CN, OUT)
    sad.add(s)  # SAD change -> the cached "no SA" is forgotten
    assert pdb.lookup_outbound(p) == (entry, s)
    assert pdb.lookup_outbound(p) == (entry, s)
    spd.add(SpdEntry("deny", OUT, ts(HOA, CN), Action.DISCARD), before="host")  # SPD change
    assert pdb.lookup_outbound(p)[0].name == "deny"
    assert spd.stats("host").hits == 3 and spd.stats("deny").hits == 1


def test_lookup_outbound_cache_is_bounded_and_still_correct() -> None:
    entry = protect("host", OUT, ts(HOA, "any6"))
    s = sa(0x9101, HOA, CN, OUT)
    spd = Spd([entry])
    pdb = PolicyDb(spd, Sad([s]), cache_size=4)
    for port in range(20):
        assert pdb.lookup_outbound(pkt(HOA, CN, UDP, sport=port, dport=9)) == (entry, s)
        assert len(pdb._flows) <= 4
    assert spd.stats("host").hits == 20


# --- inbound binding and the RFC 4301 5.2 check ------------------------------------------------------------


def test_transport_sa_binds_to_inbound_policy_by_addresses() -> None:
    ba = protect("ba", IN, ts(HOA, HA, MH, mh_type=6))
    mpa = protect("mpa", IN, ts(HOA, HA, ICMPV6, icmp=IcmpRange.of(147)))
    s = sa(0xA001, HA, HOA, IN)
    spd = Spd([ba, mpa])
    pdb = PolicyDb(spd, Sad([s]))
    assert pdb.inbound_policies(s) == (ba, mpa)
    assert pdb.check_inbound(s, pkt(HA, HOA, MH, mh_type=6))
    assert pdb.check_inbound(s, pkt(HA, HOA, ICMPV6, icmp_type=147, icmp_code=0))
    assert not pdb.check_inbound(s, pkt(HA, HOA, MH, mh_type=5))  # a BU on the BA SA
    assert not pdb.check_inbound(s, pkt(CN, HOA, MH, mh_type=6))  # wrong source
    assert not pdb.check_inbound(s, pkt(HA, HOA, UDP))
    assert spd.stats("ba").hits == 1 and spd.stats("mpa").hits == 1


def test_tunnel_sa_binds_by_endpoints_and_checks_the_inner_packet() -> None:
    payload_in = protect("payload-in", IN, ts(HOA, "any6"), Mode.TUNNEL, tunnel_src=A(HA), tunnel_dst=A(COA))
    s = sa(0xB001, HA, COA, IN, Mode.TUNNEL)
    stranger = sa(0xB002, CN, COA, IN, Mode.TUNNEL)
    pdb = PolicyDb(Spd([payload_in]), Sad([s, stranger]))
    assert pdb.check_inbound(s, pkt(CN, HOA, UDP, sport=53, dport=999))
    assert not pdb.check_inbound(s, pkt(CN, "2001:db8:1::200"))  # inner destination is not our HoA
    assert pdb.inbound_policies(stranger) == ()
    assert not pdb.check_inbound(stranger, pkt(CN, HOA))  # no policy -> nothing matches


def test_reqid_binding_is_exclusive() -> None:
    bu_in = protect("bu-in", IN, ts(HA, HOA, MH, mh_type=5), reqid=1, level=Level.UNIQUE)  # at the HA
    with_reqid, without = sa(0xC001, HOA, HA, IN, reqid=1), sa(0xC002, HOA, HA, IN)
    pdb = PolicyDb(Spd([bu_in]), Sad([with_reqid, without]))
    assert pdb.inbound_policies(with_reqid) == (bu_in,)
    assert pdb.inbound_policies(without) == ()


def test_inbound_binding_follows_spd_and_sad_changes() -> None:
    spd, s = Spd(), sa(0xD001, HA, HOA, IN)
    sad = Sad([s])
    pdb = PolicyDb(spd, sad)
    assert not pdb.check_inbound(s, pkt(HA, HOA))
    spd.add(protect("late", IN, ts(HOA, HA)))
    assert pdb.check_inbound(s, pkt(HA, HOA))
    replacement = sa(0xD001, CN, HOA, IN)
    sad.replace(s, replacement)
    assert not pdb.check_inbound(replacement, pkt(HA, HOA))


def test_sa_serves_requires_direction_and_mode() -> None:
    entry = protect("e", OUT, ts(HOA, HA))
    assert sa_serves(entry, sa(1000, HOA, HA, OUT).params)
    assert not sa_serves(entry, sa(1000, HOA, HA, IN).params)
    assert not sa_serves(entry, sa(1000, HOA, HA, OUT, Mode.TUNNEL).params)
    assert not sa_serves(SpdEntry("b", OUT, ts(HOA, HA), Action.BYPASS), sa(1000, HOA, HA, OUT).params)


# --- the query interface (draft 4.3.2 / 4.4.2) -------------------------------------------------------------


def _mn_policies() -> tuple[Spd, Sad[FakeSa], dict[str, FakeSa]]:
    """The MN's host-wide SPD of draft section 4.2.2: BU/BA first, then the payload tunnel."""
    sas = {
        "bu": sa(0x2001, HOA, HA, OUT, reqid=1),
        "ba": sa(0x2002, HA, HOA, IN, reqid=2),
        "data-out": sa(0x2007, COA, HA, OUT, Mode.TUNNEL),
        "data-in": sa(0x2008, HA, COA, IN, Mode.TUNNEL),
    }
    spd = Spd([
        protect("bu", OUT, ts(HOA, HA, MH, mh_type=5), reqid=1, level=Level.UNIQUE),
        protect("ba", IN, ts(HOA, HA, MH, mh_type=6), reqid=2, level=Level.UNIQUE),
        protect("data-out", OUT, ts(HOA, "any6"), Mode.TUNNEL, tunnel_src=A(COA), tunnel_dst=A(HA)),
        protect("data-in", IN, ts(HOA, "any6"), Mode.TUNNEL, tunnel_src=A(HA), tunnel_dst=A(COA)),
        SpdEntry("nd", OUT, ts("any6", "any6", ICMPV6), Action.BYPASS),
    ])
    return spd, Sad(sas.values()), sas


def test_query_outbound_tells_bu_spi_from_data_spi() -> None:
    spd, sad, sas = _mn_policies()
    pdb = PolicyDb(spd, sad)
    bu = pdb.query_outbound(pkt(HOA, HA, MH, mh_type=5))
    data = pdb.query_outbound(pkt(HOA, HA, UDP, sport=5, dport=6))
    assert (bu.entry.name, bu.spi) == ("bu", 0x2001)
    assert (data.entry.name, data.spi) == ("data-out", 0x2007)
    entry, spi, _ = bu  # it unpacks like the (SpdEntry, spi) pair of the brief
    assert entry.reqid == 1 and spi == 0x2001
    bypass = pdb.query_outbound(pkt("fe80::1", "ff02::1", ICMPV6, icmp_type=135, icmp_code=0))
    assert (bypass.entry.name, bypass.spi) == ("nd", None)
    assert pdb.query_outbound(pkt("2001:db8:5::5", CN)).entry.name == "default-out"
    assert spd.stats("bu").hits == 0  # a query is not traffic
    d = json.loads(json.dumps(bu.to_dict()))
    assert d["spi"] == 0x2001 and d["sa"]["spi_hex"] == "0x00002001" and d["policy"]["name"] == "bu"


def test_query_outbound_reports_missing_sa() -> None:
    spd, sad, sas = _mn_policies()
    sad.remove(sas["bu"])
    ans = PolicyDb(spd, sad).query_outbound(pkt(HOA, HA, MH, mh_type=5))
    assert ans.entry.name == "bu" and ans.spi is None and ans.to_dict()["sa"] is None


def test_query_inbound_spi_gives_the_sa_selectors() -> None:
    spd, sad, _ = _mn_policies()
    pdb = PolicyDb(spd, sad)
    ba = pdb.query_inbound_spi(0x2002)
    assert ba is not None
    assert (ba.mode, ba.src, ba.dst, ba.reqid) == (Mode.TRANSPORT, A(HA), A(HOA), 2)
    assert [s.mh_type for s in ba.selectors] == [6] and ba.policies == ("ba",)
    data = pdb.query_inbound_spi(0x2008)
    assert data.mode == Mode.TUNNEL and data.selectors[0].mh_type is None
    assert pdb.query_inbound_spi(0x2001) is None  # outbound SPI
    assert pdb.query_inbound_spi(0x7777) is None
    text = json.dumps(ba.to_dict())
    assert '"mh_type": 6' in text and '"mode": "transport"' in text
    assert KEY.hex() not in json.dumps(pdb.to_dict())  # keys never leave through the control socket


def test_ha_tells_a_bu_from_data_by_the_inbound_spi() -> None:
    """Draft 4.4.2: the HA looks up the SPI's traffic selectors to see whether an ESP packet is a
    BU (so it records the outer IPv4 address before the packet goes to the BITS)."""
    spd = Spd([
        protect("bu-in", IN, ts(HA, HOA, MH, mh_type=5)),
        protect("data-in", IN, ts("any6", HOA), Mode.TUNNEL, tunnel_src=A(COA), tunnel_dst=A(HA)),
    ])
    sad = Sad([sa(0x3001, HOA, HA, IN), sa(0x3007, COA, HA, IN, Mode.TUNNEL)])
    pdb = PolicyDb(spd, sad)

    def is_bu(spi: int) -> bool:
        ans = pdb.query_inbound_spi(spi)
        return ans is not None and any(s.mh_type == 5 for s in ans.selectors)

    assert is_bu(0x3001) and not is_bu(0x3007) and not is_bu(0x3002)
