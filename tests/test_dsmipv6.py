"""DSMIPv6 data plane (RFC 5555; draft Req #3 and #4) between two real engines, in memory.

Every packet is real: the MN's and the HA's ``bits.engine`` apply and check ESP, the tunnel modules
(``MnTunnel`` / ``HaTunnel`` with ``mobility.udp4191``) decide, a ``BindingUpdateList`` and a
``BindingCache`` run the signalling. The IPv4 network in between is a function (``World``)::

    MN engine -> MnTunnel.outbound -> (Ipv4Path) -> [NAT for 192.168.1.100] -> HaTunnel.inbound_udp
      -> HA engine -> MH: bu_udp_source -> BindingCache -> BindingTable, BA
    HA engine -> HaTunnel.outbound -> (Ipv4Path) -> [NAT back] -> MnTunnel.inbound_udp -> MN engine

192.168.1.100 sits behind a NAT (public 203.0.113.2); 198.51.100.100 is public (no NAT); the HA's
IPv4 address is 203.0.113.1.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet6 import HAO, ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrRouting
from scapy.layers.ipsec import ESP

from bits.engine import Engine, build_engine
from bits.setkey import parse_setkey
from bits.verdict import Drop, DropReason
from mobility.binding import (
    BindingCache,
    BindingCacheEntry,
    BindingCreated,
    BindingDeleted,
    BindingUpdated,
    DeleteReason,
    HomeAgentConfig,
    Ipv4Endpoint,
)
from mobility.bul import BindingUpdateList, MobileNodeConfig, Registered
from mobility.constants import BaStatus, BuFlag
from mobility.ipv6ext import pull_mh_packet, push_mh_packet
from mobility.mh import BindingAck, BindingUpdate
from mobility.options import AlternateCareOfAddress, Ipv4CareOfAddress, NatDetection, find_option
from mobility.tunnel import (
    INBOUND_QUERY_BUDGET,
    ApiClassifier,
    BindingTable,
    EngineQueryError,
    HaTunnel,
    HeuristicClassifier,
    Kind,
    MnState,
    MnTunnel,
    Reason,
    Route,
    TunnelDrop,
    make_classifier,
)
from mobility.udp4191 import (
    DSMIPV6_PORT,
    Encap,
    Ipv4Path,
    OuterRecords,
    pull_ipv4_outer,
    push_ipip,
    push_udp4,
    udp_path,
)
from tests.mipv6_sas import HA_SPD, MN_SPD, SAS, SPI_BA, SPI_BU, SPI_HA_DATA, SPI_MN_DATA
from tests.mipv6_sas import key as _key

HOA, HA, CN = "2001:db8:1::100", "2001:db8:1::1", "2001:db8:c::1"
HA4 = "203.0.113.1"
PRIV, NAT_PUB, PUB = "192.168.1.100", "203.0.113.2", "198.51.100.100"
ATTACKER = "203.0.113.66"
MN_PORT = 40000




def _rand() -> Callable[[int], bytes]:
    counter = itertools.count()
    return lambda n: bytes((next(counter) + i) & 0xFF for i in range(n))


def mn_engine() -> Engine:
    return build_engine(parse_setkey(SAS + MN_SPD, local_addresses=[HOA]), rand=_rand(), now=0.0)


def ha_engine() -> Engine:
    return build_engine(parse_setkey(SAS + HA_SPD, local_addresses=[HA]), rand=_rand(), now=0.0)


def engine_inbound_seq(engine: Engine) -> Callable[[int], int | None]:
    """What ``mobility.io.udp4191.control_inbound_seq`` asks the engine over its control socket."""

    def seq(spi: int) -> int | None:
        return next((sa["seq"] for sa in engine.status()["sas"] if sa["spi"] == spi and sa["direction"] == "in"),
                    None)

    return seq


def ping(src: str, dst: str, seq: int = 0, size: int = 16) -> bytes:
    return bytes(IPv6(src=src, dst=dst) / ICMPv6EchoRequest(id=7, seq=seq, data=b"x" * size))


def bu_v4(seq: int, coa4: str, flags: BuFlag = BuFlag.A | BuFlag.H) -> bytes:
    bu = BindingUpdate(seq, flags, 60, (Ipv4CareOfAddress(IPv4Address(coa4)),))
    return push_mh_packet(bu, HOA, HA)


def esp_of(engine: Engine, packet: bytes, now: float = 1.0) -> bytes:
    out = engine.process_outbound(packet, now)
    assert not isinstance(out, Drop), out
    return out


def only(out: list) -> tuple[bytes, Ipv4Path]:
    assert len(out) == 1, out
    packet, route = out[0]
    assert isinstance(route, Ipv4Path), route
    return packet, route


class Nat:
    """A NAT (MASQUERADE-like) for the addresses in ``inside``: (address, port) -> public port."""

    def __init__(self, public: str, inside: set[str]) -> None:
        self.public, self.inside = public, inside
        self.next_port = 50000
        self.out_map: dict[tuple[str, int], int] = {}
        self.back_map: dict[int, tuple[str, int]] = {}

    def outbound(self, src: str, sport: int) -> tuple[str, int]:
        if src not in self.inside:
            return src, sport
        port = self.out_map.get((src, sport))
        if port is None:
            port = self.out_map[(src, sport)] = self.next_port
            self.back_map[port] = (src, sport)
            self.next_port += 1
        return self.public, port

    def inbound(self, dst: str, dport: int) -> tuple[str, int] | None:
        if dst != self.public:
            return dst, dport
        return self.back_map.get(dport)

    def flush(self) -> None:
        """conntrack -F: the next packet gets a new mapping (a new port)."""
        self.out_map.clear()
        self.back_map.clear()


class World:
    """MN and HA with real engines, tunnel modules, BUL and binding cache; an IPv4 network with a
    NAT in front of PRIV. ``hold_to_mn``: packets to the MN wait in ``held`` (a slow path)."""

    def __init__(self, mode: str, *, ha_kw: dict | None = None, mn_kw: dict | None = None,
                 mn_query: Callable | None = None, ha_seq: bool = True) -> None:
        self.mode = mode
        self.mn_e, self.ha_e = mn_engine(), ha_engine()
        self.table = BindingTable()
        self.mn = MnTunnel(HOA, HA, make_classifier(mode, "mn", mn_query or self.mn_e.query_outbound),
                           ha_ipv4=HA4, tracing=True)
        ha_cls = make_classifier(mode, "ha", self.ha_e.query_outbound, self.ha_e.query_inbound_spi)
        seq = engine_inbound_seq(self.ha_e) if mode == "api" and ha_seq else None
        self.ha = HaTunnel(HA, self.table, ha_cls, tracing=True, inbound_seq=seq)
        self.cache = BindingCache(HomeAgentConfig(home_prefixes=("2001:db8:1::/64",), **(ha_kw or {})))
        cfg = MobileNodeConfig(hoa=IPv6Address(HOA), ha=IPv6Address(HA), ha_ipv4=IPv4Address(HA4), **(mn_kw or {}))
        self.bul = BindingUpdateList(cfg, rand=lambda n: b"\x00\x10"[:n])
        self.nat = Nat(NAT_PUB, {PRIV})
        self.now = 1.0
        self.to_ha_log: list[tuple[float, Ipv4Path, int]] = []  # (time, path, SPI) as sent by the MN
        self.to_mn_log: list[tuple[float, Ipv4Path, int]] = []
        self.cn_got: list[bytes] = []
        self.mn_got: list[bytes] = []
        self.ha_drops: list[Drop] = []
        self.mn_events: list = []
        self.ha_events: list = []
        self.hold_to_mn = False
        self.held: list[tuple[bytes, Ipv4Path]] = []
        self.lost_to_mn = 0
        self.frames: list[bytes] = []  # every IPv4 packet as it would be on the HA's link

    # -- MN -> HA ---------------------------------------------------------------------------------------------

    def mn_send(self, packet: bytes) -> None:
        for esp, path in self.mn.outbound(esp_of(self.mn_e, packet, self.now), self.now):
            self.to_ha(esp, path)

    def to_ha(self, esp: bytes, path: Ipv4Path | Route) -> None:
        assert isinstance(path, Ipv4Path), path
        self.to_ha_log.append((self.now, path, int.from_bytes(esp[40:44], "big")))
        assert path.dst == HA4 and path.src in (PRIV, PUB)
        if path.encap is Encap.UDP:
            assert path.port == DSMIPV6_PORT
            src, sport = self.nat.outbound(path.src, MN_PORT)
            self.frames.append(push_udp4(src, sport, HA4, DSMIPV6_PORT, esp))
            got = self.ha.inbound_udp(esp, src, sport, self.now)
        else:
            assert path.src not in self.nat.inside  # a NAT would have dropped protocol 41
            self.frames.append(push_ipip(path.src, HA4, esp))
            got = self.ha.inbound_ipip(self.frames[-1], self.now)
        if isinstance(got, bytes):
            self.ha_receive(got)

    def ha_receive(self, packet: bytes) -> None:
        assert self.ha.inbound(packet, self.now) is None  # the hook: no Home Address option here
        inner = self.ha_e.process_inbound(packet, self.now)
        if isinstance(inner, Drop):
            self.ha_drops.append(inner)
            return
        found = pull_mh_packet(inner)
        if found is None:
            self.cn_got.append(inner)
            return
        loc, bu = found
        assert isinstance(bu, BindingUpdate) and str(loc.src) == HOA
        udp = self.ha.bu_udp_source(HOA, bu, self.now)
        ack, events = self.cache.handle_binding_update(bu, hoa=HOA, src=HOA, now=self.now, udp_source=udp)
        self.ha_events += events
        self.table.apply(events)
        alt = find_option(bu.options, AlternateCareOfAddress)
        self.ha.expect_binding_ack(HOA, udp if udp is not None else alt.coa)
        if ack is not None:
            self.ha_send(push_mh_packet(ack, HA, HOA))

    # -- HA -> MN ---------------------------------------------------------------------------------------------

    def ha_send(self, packet: bytes) -> None:
        for esp, path in self.ha.outbound(esp_of(self.ha_e, packet, self.now), self.now):
            self.to_mn(esp, path)

    def to_mn(self, esp: bytes, path: Ipv4Path | Route) -> None:
        assert isinstance(path, Ipv4Path), path
        if self.hold_to_mn:
            self.held.append((esp, path))
            return
        self.to_mn_log.append((self.now, path, int.from_bytes(esp[40:44], "big")))
        self.frames.append(push_udp4(HA4, DSMIPV6_PORT, path.dst, path.port, esp) if path.encap is Encap.UDP
                           else push_ipip(HA4, path.dst, esp))
        if path.encap is Encap.UDP:
            back = self.nat.inbound(path.dst, path.port)
            if back is None or back != (back[0], MN_PORT):
                self.lost_to_mn += 1  # no NAT mapping (any more): the NAT drops it
                return
            got = self.mn.inbound_udp(esp, HA4, DSMIPV6_PORT, self.now)
        else:
            assert path.dst == PUB
            got = self.mn.inbound_ipip(push_ipip(HA4, path.dst, esp), self.now)
        assert isinstance(got, bytes), got
        assert self.mn.inbound(got, self.now) is None  # the hook leaves ESP to the HoA alone
        inner = self.mn_e.process_inbound(got, self.now)
        assert not isinstance(inner, Drop), inner
        found = pull_mh_packet(inner)
        if found is None:
            self.mn_got.append(inner)
            return
        _, ba = found
        assert isinstance(ba, BindingAck)
        result = self.bul.handle_binding_ack(ba, self.now)
        self.mn_events += result.events
        for ev in result.events:
            if isinstance(ev, Registered):
                self.mn.binding_acknowledged(ev.coa, udp_encap=ev.udp_encap)
        self.send_bus(result.messages)

    def release(self) -> None:
        self.hold_to_mn = False
        held, self.held = self.held, []
        for esp, path in held:
            self.to_mn(esp, path)

    # -- control ----------------------------------------------------------------------------------------------

    def send_bus(self, messages) -> None:
        for out in messages:
            self.mn.expect_binding_update(out.src)
            self.mn_send(push_mh_packet(out.bu, HOA, HA))

    def move(self, coa4: str) -> None:
        result = self.bul.movement(IPv4Address(coa4), self.now)
        self.send_bus(result.messages)

    def advance(self, t: float) -> None:
        """Run the BUL's timers (retransmissions, refreshes = NAT keepalives) up to ``t``."""
        while (due := self.bul.next_timer()) is not None and due <= t:
            self.now = max(self.now, due)
            self.send_bus(self.bul.handle_timer(self.now).messages)
        self.now = t

    @property
    def entry(self) -> BindingCacheEntry | None:
        return self.cache.lookup(HOA)

    def cn_ping(self, seq: int) -> bool:
        before = len(self.mn_got)
        self.ha_send(ping(CN, HOA, seq))
        return len(self.mn_got) == before + 1

    def mn_ping(self, seq: int) -> bool:
        before = len(self.cn_got)
        self.mn_send(ping(HOA, CN, seq))
        return len(self.cn_got) == before + 1


MODES = ["api", "heuristic"]


# --- the MN's packets (RFC 5555 4.2, draft 4.3) --------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_bu_from_an_ipv4_coa_goes_unchanged_in_udp_to_port_4191(mode):
    mn_e, ha_e = mn_engine(), ha_engine()
    mn = MnTunnel(HOA, HA, make_classifier(mode, "mn", mn_e.query_outbound), ha_ipv4=HA4)
    mn.expect_binding_update(IPv4Address(PRIV))
    esp = esp_of(mn_e, bu_v4(1, PRIV))
    packet, path = only(mn.outbound(esp, 1.0))
    assert packet == esp  # no Home Address option, source still the HoA, ESP untouched
    assert path == Ipv4Path(Encap.UDP, HA4, DSMIPV6_PORT, PRIV)
    pkt = IPv6(packet)
    assert (pkt.src, pkt.dst, pkt[ESP].spi) == (HOA, HA, SPI_BU) and IPv6ExtHdrDestOpt not in pkt
    assert mn.counts["out_signal"] == 1 and mn.counts["out_udp"] == 1

    ha = HaTunnel(HA, BindingTable(), make_classifier(mode, "ha", ha_e.query_outbound, ha_e.query_inbound_spi))
    assert ha.inbound_udp(packet, NAT_PUB, 50000, 1.0) == packet
    _, bu = pull_mh_packet(ha_e.process_inbound(packet, 1.0))
    assert find_option(bu.options, Ipv4CareOfAddress).coa == IPv4Address(PRIV)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("udp_encap", [True, False])
def test_data_waits_for_the_ba_then_uses_udp_or_ipv6_in_ipv4(mode, udp_encap):
    mn_e = mn_engine()
    mn = MnTunnel(HOA, HA, make_classifier(mode, "mn", mn_e.query_outbound), ha_ipv4=HA4)
    mn.expect_binding_update(PUB)
    assert only(mn.outbound(esp_of(mn_e, bu_v4(1, PUB)), 1.0))[1].encap is Encap.UDP
    assert mn.outbound(esp_of(mn_e, ping(HOA, CN)), 1.0) == []  # Req #3: nothing before the BA
    assert mn.drops[TunnelDrop.NO_COA] == 1
    mn.binding_acknowledged(PUB, udp_encap=udp_encap)
    esp = esp_of(mn_e, ping(HOA, CN, 1))
    packet, path = only(mn.outbound(esp, 1.0))
    assert packet == esp
    if udp_encap:
        assert path == Ipv4Path(Encap.UDP, HA4, DSMIPV6_PORT, PUB)
    else:
        assert path == Ipv4Path(Encap.IPIP, HA4, 0, PUB)
    assert mn.status()["coa"] == PUB and mn.state is MnState.REGISTERED


def test_an_ipv4_coa_needs_the_has_ipv4_address():
    mn = MnTunnel(HOA, HA, HeuristicClassifier())
    with pytest.raises(Exception, match="ha_ipv4"):
        mn.expect_binding_update(PRIV)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("old", "new"), [(PRIV, PUB), ("2001:db8:f::100", PRIV), (PUB, "2001:db8:e::100")])
def test_req3_bu_leaves_via_the_new_coa_data_via_the_old_until_the_ba(mode, old, new):
    """Draft 4.3: after a move the BU leaves from the new CoA (IPv4: in UDP), data keeps the old
    one -- also across address families -- until the BA; a data flood surrounds the BU."""
    mn_e = mn_engine()
    mn = MnTunnel(HOA, HA, make_classifier(mode, "mn", mn_e.query_outbound), ha_ipv4=HA4, tracing=True)
    mn.expect_binding_update(old)
    mn.binding_acknowledged(old, udp_encap=old == PRIV)

    def sources(out: list) -> tuple[str, str]:
        (packet, route), = out
        if isinstance(route, Ipv4Path):
            return route.src, route.encap.name
        return IPv6(packet).src, "ipv6"

    t = 2.0
    for i in range(40):  # data flowing before the move: the heuristic learns the data SPI
        t += 0.01
        assert sources(mn.outbound(esp_of(mn_e, ping(HOA, CN, i)), t))[0] == old
    mn.expect_binding_update(new)
    assert mn.state is MnState.MOVING
    during, bu = [], None
    for i in range(40, 80):
        t += 0.01
        during.append(sources(mn.outbound(esp_of(mn_e, ping(HOA, CN, i)), t)))
        if i == 60:
            bu = mn.outbound(esp_of(mn_e, bu_v4(2, new) if "." in new else _bu6(2, new)), t)
    assert {src for src, _ in during} == {old}  # no data packet via the new CoA before the BA
    assert sources(bu)[0] == new
    if "." in new:
        assert sources(bu) == (new, "UDP") and bu[0][0][6] == 50  # unchanged IPv6 header, ESP next
    else:
        assert IPv6ExtHdrDestOpt in IPv6(bu[0][0])
    signal = [e for e in mn.drain_events() if e.kind is Kind.SIGNAL]
    assert len(signal) == 1 and signal[0].spi == SPI_BU and signal[0].mode.value == mode
    mn.binding_acknowledged(new)
    assert sources(mn.outbound(esp_of(mn_e, ping(HOA, CN, 99)), t))[0] == new


def _bu6(seq: int, coa: str) -> bytes:
    bu = BindingUpdate(seq, BuFlag.A | BuFlag.H, 60, (AlternateCareOfAddress(IPv6Address(coa)),))
    return push_mh_packet(bu, HOA, HA)


def test_heuristic_needs_no_engine_and_api_falls_back_when_it_is_unreachable():
    def unreachable(_sel):
        raise EngineQueryError("control socket unreachable")

    for classifier in (make_classifier("heuristic", "mn", unreachable), make_classifier("api", "mn", unreachable)):
        mn_e = mn_engine()
        mn = MnTunnel(HOA, HA, classifier, ha_ipv4=HA4)
        mn.expect_binding_update(PRIV)
        mn.binding_acknowledged(PRIV, udp_encap=True)
        for i in range(10):
            assert only(mn.outbound(esp_of(mn_e, ping(HOA, CN, i)), 1.0 + i * 0.01))[1].src == PRIV
        mn.expect_binding_update(PUB)
        assert only(mn.outbound(esp_of(mn_e, bu_v4(3, PUB)), 1.2))[1].src == PUB
        reason = Reason.API_UNAVAILABLE if classifier.mode.value == "api" else Reason.DIFFERS_FROM_DATA
        assert mn.reasons[reason] >= 1


# --- the MN's receiving side -------------------------------------------------------------------------------


def test_mn_takes_only_esp_from_the_ha_out_of_udp_and_ipv6_in_ipv4():
    mn_e, ha_e = mn_engine(), ha_engine()
    mn = MnTunnel(HOA, HA, HeuristicClassifier(), ha_ipv4=HA4, tracing=True)
    esp = esp_of(ha_e, ping(CN, HOA))
    assert mn.inbound_udp(esp, HA4, DSMIPV6_PORT, 1.0) == esp
    assert mn_e.process_inbound(esp, 1.0) == ping(CN, HOA)
    assert mn.inbound_ipip(push_ipip(HA4, PUB, esp), 1.0) == esp
    assert mn.inbound_udp(esp, ATTACKER, DSMIPV6_PORT, 1.0) is TunnelDrop.WRONG_PEER
    assert mn.inbound_udp(esp, HA4, 4500, 1.0) is TunnelDrop.WRONG_PEER
    assert mn.inbound_ipip(push_ipip(ATTACKER, PUB, esp), 1.0) is TunnelDrop.WRONG_PEER
    assert mn.inbound_udp(ping(CN, HOA), HA4, DSMIPV6_PORT, 1.0) is TunnelDrop.WRONG_ADDRESS  # not from the HA
    assert mn.inbound_udp(ping(HA, HOA), HA4, DSMIPV6_PORT, 1.0) is TunnelDrop.NOT_ESP
    assert mn.inbound_udp(b"\x45" + bytes(40), HA4, DSMIPV6_PORT, 1.0) is TunnelDrop.NOT_IPV6
    assert mn.inbound_udp(esp[:30], HA4, DSMIPV6_PORT, 1.0) is TunnelDrop.MALFORMED
    assert mn.inbound_ipip(b"\x45\x00", 1.0) is TunnelDrop.MALFORMED
    assert mn.counts["in_decap"] == 2
    events = [e.to_dict() for e in mn.drain_events()]
    assert events[0]["kind"] == "decap" and events[0]["outer"] == f"udp {HA4}:{DSMIPV6_PORT}"
    assert events[2]["drop"] == "wrong-peer" and events[2]["outer"] == f"udp {ATTACKER}:{DSMIPV6_PORT}"


# --- NAT detection, data paths, keepalives: the whole loop -------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_nat_detected_exactly_when_there_is_a_nat_and_data_follows_the_record(mode):
    w = World(mode)
    w.move(PRIV)  # behind the NAT
    entry = w.entry
    assert entry is not None and entry.coa == IPv4Address(PRIV)
    assert entry.nat_detected and entry.udp_encap
    assert entry.udp_source == Ipv4Endpoint(IPv4Address(NAT_PUB), 50000)  # the NAT's address and port
    assert w.bul.binding is not None and w.bul.binding.nat_detected and w.mn.udp_encap
    ba_path = w.to_mn_log[-1][1]
    assert ba_path == Ipv4Path(Encap.UDP, NAT_PUB, 50000)  # BA: UDP to the recorded V4ADDR:Z
    assert w.cn_ping(1) and w.to_mn_log[-1][1] == Ipv4Path(Encap.UDP, NAT_PUB, 50000)
    assert w.mn_ping(2) and w.to_ha_log[-1][1] == Ipv4Path(Encap.UDP, HA4, DSMIPV6_PORT, PRIV)

    w.now = 5.0
    w.move(PUB)  # a public IPv4 network: no NAT, no F -> IPv6 in IPv4
    entry = w.entry
    assert (entry.coa, entry.nat_detected, entry.udp_encap) == (IPv4Address(PUB), False, False)
    assert entry.udp_source == Ipv4Endpoint(IPv4Address(PUB), MN_PORT)
    assert w.to_mn_log[-1][1] == Ipv4Path(Encap.UDP, PUB, MN_PORT)  # the BA still in UDP
    assert not w.bul.binding.nat_detected and not w.mn.udp_encap
    assert w.cn_ping(3) and w.to_mn_log[-1][1] == Ipv4Path(Encap.IPIP, PUB)
    assert w.mn_ping(4) and w.to_ha_log[-1][1] == Ipv4Path(Encap.IPIP, HA4, 0, PUB)
    assert not w.ha_drops and w.lost_to_mn == 0
    # what the HA decided, and why, is in its trace
    commits = [e.to_dict() for e in w.ha.drain_events() if e.kind is Kind.COMMIT]
    assert [(c["coa"], c["outer"]) for c in commits] == [(PRIV, f"udp {NAT_PUB}:50000"), (PUB, f"udp {PUB}:{MN_PORT}")]
    expected = "record-seq" if mode == "api" else "record-latest"
    assert {c["reason"] for c in commits} == {expected} and {c["mode"] for c in commits} == {mode}


@pytest.mark.parametrize("mode", MODES)
def test_the_ba_carries_nat_detection_and_forced_udp_without_nat(mode):
    w = World(mode, mn_kw={"force_udp": True})
    w.move(PUB)
    entry = w.entry
    assert (entry.nat_detected, entry.udp_encap) == (False, True)
    assert w.bul.binding.udp_encap and w.mn.udp_encap
    assert w.cn_ping(1) and w.to_mn_log[-1][1] == Ipv4Path(Encap.UDP, PUB, MN_PORT)
    assert w.mn_ping(2) and w.to_ha_log[-1][1].encap is Encap.UDP


@pytest.mark.parametrize("mode", MODES)
def test_keepalives_are_refresh_bus_and_a_new_nat_mapping_is_followed_after_the_next_one(mode):
    w = World(mode, ha_kw={"nat_refresh_time": 20})
    w.move(PRIV)
    assert w.bul.binding.keepalive == 20.0
    first = w.entry.udp_source
    bus_before = _bu_count(w)
    w.advance(21.5)  # one keepalive: a refresh BU via UDP from the CoA, then the BA
    assert _bu_count(w) == bus_before + 1 and w.entry.udp_source == first
    assert w.to_ha_log[-1][1] == Ipv4Path(Encap.UDP, HA4, DSMIPV6_PORT, PRIV)

    w.nat.flush()  # the NAT forgets: the MN's next packet gets a new port
    assert w.mn_ping(10)  # MN -> HA still works (the HA accepts any source) ...
    assert w.entry.udp_source == first  # ... but an unauthenticated source changes nothing
    assert not w.cn_ping(11) and w.lost_to_mn == 1  # HA -> MN goes to the dead mapping
    w.advance(42.0)  # the next keepalive BU comes from the new port: authenticated -> followed
    assert w.entry.udp_source == Ipv4Endpoint(IPv4Address(NAT_PUB), 50001)
    assert isinstance(w.ha_events[-1], BindingUpdated)
    assert w.cn_ping(12) and w.to_mn_log[-1][1] == Ipv4Path(Encap.UDP, NAT_PUB, 50001)


def _bu_count(w: World) -> int:
    return sum(1 for _, _, spi in w.to_ha_log if spi == SPI_BU)


# --- garbage on UDP 4191 changes nothing (Req #4, "let authentication decide") ---------------------------------------


def _registered(mode: str) -> World:
    w = World(mode, ha_kw={"nat_refresh_time": 20})
    w.move(PRIV)
    assert w.entry.udp_source == Ipv4Endpoint(IPv4Address(NAT_PUB), 50000)
    return w


def _garbage(w: World, captured_bu: bytes) -> dict[str, bytes]:
    """One of each kind, from an attacker's address. ``captured_bu``: a genuine BU already
    delivered (its replay)."""
    ahead = esp_of(w.mn_e, bu_v4(100, PRIV), w.now)  # never sent: sequence number ahead
    forged = bytearray(ahead)
    forged[-1] ^= 0xFF  # the ICV no longer matches
    unknown = bytearray(esp_of(w.mn_e, ping(HOA, CN, 5), w.now))
    unknown[40:44] = (0xDEAD).to_bytes(4, "big")
    return {
        "random": bytes(range(7, 71)),
        "truncated": ahead[:45],
        "not-ipv6": b"\xff",  # the RFC 3948 NAT-keepalive octet is no DSMIPv6 message
        "cleartext": ping(HOA, HA),
        "unknown-spi": bytes(unknown),
        "replayed": captured_bu,
        "forged": bytes(forged),
    }


@pytest.mark.parametrize("mode", MODES)
def test_garbage_is_a_counted_drop_and_changes_no_binding(mode):
    w = _registered(mode)
    w.mn.expect_binding_update(PRIV)
    captured, _ = only(w.mn.outbound(esp_of(w.mn_e, bu_v4(50, PRIV), w.now), w.now))
    w.ha_receive(w.ha.inbound_udp(captured, NAT_PUB, 50000, w.now))  # delivered once, genuinely
    before, engine_before = w.entry, dict(w.ha_e.drops)
    w.ha_drops.clear()
    results = {}
    for name, data in _garbage(w, captured).items():
        got = w.ha.inbound_udp(data, ATTACKER, 6666, w.now)
        if isinstance(got, bytes):
            w.ha_receive(got)  # the engine decides
        results[name] = got
    assert results["random"] is TunnelDrop.NOT_IPV6
    assert results["truncated"] is TunnelDrop.MALFORMED
    assert results["not-ipv6"] is TunnelDrop.NOT_IPV6
    assert results["cleartext"] is TunnelDrop.NOT_ESP
    assert sorted(d.reason.value for d in w.ha_drops) == ["auth-failed", "replay", "unknown-spi"]
    assert sum(w.ha_e.drops.values()) == sum(engine_before.values()) + 3
    assert sum(w.ha.drops.values()) == 4
    assert w.entry == before  # nothing committed
    w.now += 10  # the records of the garbage expire unclaimed
    w.ha.expire_records(w.now)
    # api recorded the second genuine BU too; the heuristic did not (it came from the bound endpoint)
    assert len(w.ha.records) == 0 and w.ha.records.counts["taken"] == (2 if mode == "api" else 1)
    assert w.cn_ping(1) and w.entry == before


@pytest.mark.parametrize("mode", MODES)
def test_garbage_recorded_before_a_refresh_from_the_bound_endpoint_is_not_taken(mode):
    w = _registered(mode)
    forged = bytearray(esp_of(w.mn_e, bu_v4(77, PRIV), w.now))
    forged[-1] ^= 1
    w.now = 3.0
    got = w.ha.inbound_udp(bytes(forged), ATTACKER, 6666, w.now)
    w.ha_receive(got)  # the engine drops it; both modes recorded it (BU SPI / outer differs)
    assert [c.endpoint for c in w.ha.records.pending(IPv6Address(HOA).packed)] == [(ATTACKER, 6666)]
    w.advance(21.5)  # the genuine keepalive BU from the bound endpoint
    assert w.entry.udp_source == Ipv4Endpoint(IPv4Address(NAT_PUB), 50000)
    last_commit = [e for e in w.ha.drain_events() if e.kind is Kind.COMMIT][-1]
    # api: the engine's replay edge names the keepalive's record; heuristic: the keepalive came
    # from the bound endpoint on the BU SPI, so older records cannot be its source
    assert last_commit.reason is (Reason.RECORD_SEQ if mode == "api" else Reason.RECORD_BINDING)
    assert last_commit.outer == f"udp {NAT_PUB}:50000"


def test_api_takes_the_record_of_the_packet_the_engine_authenticated():
    """A forged packet on the BU SPI arrives from elsewhere after the genuine BU but before the
    mobility module handles it: the engine's anti-replay edge names the genuine record."""
    w = _registered("api")
    w.mn.expect_binding_update(PRIV)
    genuine, _ = only(w.mn.outbound(esp_of(w.mn_e, bu_v4(60, PRIV), w.now), w.now))
    forged = bytearray(genuine)
    forged[44:48] = (int.from_bytes(genuine[44:48], "big") + 1).to_bytes(4, "big")  # a later seq
    forged[-1] ^= 1
    w.nat.flush()  # and the MN's NAT mapping changed: the genuine BU now comes from a new port
    src, sport = w.nat.outbound(PRIV, MN_PORT)
    held = w.ha.inbound_udp(genuine, src, sport, w.now)
    w.ha.inbound_udp(bytes(forged), ATTACKER, 6666, w.now)  # recorded after it (BU SPI)
    assert len(w.ha.records) == 2
    w.ha_receive(held)
    assert w.entry.udp_source == Ipv4Endpoint(IPv4Address(NAT_PUB), 50001)
    assert w.ha.reasons[Reason.RECORD_SEQ] >= 2


def test_heuristic_race_loser_heals_at_the_next_bu():
    """The heuristic's limit (docs/dsmipv6.md): a forged packet landing between the genuine BU and
    its processing wins; the BA goes astray, the MN retransmits, the retransmission is recorded
    last and wins."""
    w = _registered("heuristic")
    w.nat.flush()
    w.now = 3.0
    result = w.bul.handle_binding_refresh_request(w.now)  # the HA asked: a refresh BU now
    (out,) = result.messages
    w.mn.expect_binding_update(out.src)
    genuine, _ = only(w.mn.outbound(esp_of(w.mn_e, push_mh_packet(out.bu, HOA, HA), w.now), w.now))
    src, sport = w.nat.outbound(PRIV, MN_PORT)
    held = w.ha.inbound_udp(genuine, src, sport, w.now)
    w.ha.inbound_udp(genuine[:44] + bytes(4) + genuine[48:], ATTACKER, 6666, w.now)  # forged, recorded last
    w.ha_receive(held)
    assert w.entry.udp_source == Ipv4Endpoint(IPv4Address(ATTACKER), 6666)  # lost the race
    assert w.lost_to_mn == 1 and w.bul.state.name == "REFRESHING"  # the BA went to the forger
    w.advance(w.now + 2.0)  # the BA never came: the MN retransmits from the new mapping
    assert w.entry.udp_source == Ipv4Endpoint(IPv4Address(NAT_PUB), 50001)
    assert w.cn_ping(5)


def test_ipv6_in_ipv4_is_taken_only_from_the_bindings_coa():
    w = World("heuristic")
    w.move(PUB)
    esp = esp_of(w.mn_e, ping(HOA, CN, 1), w.now)
    w.mn.outbound(esp, w.now)  # keep the MN engine's sequence ahead
    esp2 = esp_of(w.mn_e, ping(HOA, CN, 2), w.now)
    assert w.ha.inbound_ipip(push_ipip(ATTACKER, HA4, esp2), w.now) is TunnelDrop.WRONG_PEER
    assert w.ha.inbound_ipip(push_ipip(PUB, HA4, esp2), w.now) == esp2
    assert w.ha.inbound_ipip(push_ipip(PUB, HA4, ping(HOA, HA)), w.now) is TunnelDrop.NOT_ESP
    assert w.ha.inbound_ipip(push_udp4(PUB, 1, HA4, 2, esp2), w.now) is TunnelDrop.MALFORMED  # protocol 17


# --- classification on the HA's UDP port (draft 4.4.2) ------------------------------------------------------------


def test_ha_api_records_bus_only_and_heuristic_records_changed_outer_addresses():
    mn_e, ha_e = mn_engine(), ha_engine()
    bu = esp_of(mn_e, bu_v4(1, PRIV))
    data = esp_of(mn_e, ping(HOA, CN))
    table = BindingTable()

    api = HaTunnel(HA, table, make_classifier("api", "ha", ha_e.query_outbound, ha_e.query_inbound_spi), tracing=True)
    api.inbound_udp(bu, NAT_PUB, 50000, 1.0)
    api.inbound_udp(data, NAT_PUB, 50000, 1.0)
    assert [c.spi for c in api.records.pending(bytes.fromhex("20010db8000100000000000000000100"))] == [SPI_BU]
    assert (api.reasons[Reason.API_SIGNAL_SPI], api.reasons[Reason.API_OTHER_SPI]) == (1, 1)

    heur = HaTunnel(HA, table, HeuristicClassifier(), tracing=True)
    heur.inbound_udp(bu, NAT_PUB, 50000, 1.0)  # no binding: recorded
    table.set_ipv4(HOA, PRIV, udp_source=Ipv4Endpoint(IPv4Address(NAT_PUB), 50000), udp_encap=True)
    heur.inbound_udp(data, NAT_PUB, 50000, 1.0)  # the binding's own endpoint: not recorded
    heur.inbound_udp(data, NAT_PUB, 50001, 1.0)  # a new port: a NAT-detection BU or garbage
    reasons = [(e.reason, e.kind, e.outer) for e in heur.drain_events()]
    assert reasons == [
        (Reason.NO_BINDING, Kind.SIGNAL, f"udp {NAT_PUB}:50000"),
        (Reason.OUTER_KNOWN, Kind.DATA, f"udp {NAT_PUB}:50000"),
        (Reason.OUTER_CHANGED, Kind.SIGNAL, f"udp {NAT_PUB}:50001"),
    ]
    assert heur.counts["in_recorded"] == 2


def test_ha_heuristic_works_with_the_engine_unreachable():
    def unreachable(*_a):
        raise EngineQueryError("no control socket")

    mn_e = mn_engine()
    ha = HaTunnel(HA, BindingTable(), make_classifier("api", "ha", unreachable, unreachable))
    assert ha.inbound_udp(esp_of(mn_e, bu_v4(1, PRIV)), NAT_PUB, 50000, 1.0) is not None
    assert ha.reasons[Reason.NO_BINDING] == 1 and ha.classifier.failures == 1
    heur = HaTunnel(HA, BindingTable(), make_classifier("heuristic", "ha", unreachable, unreachable))
    heur.inbound_udp(esp_of(mn_e, bu_v4(2, PRIV)), NAT_PUB, 50000, 1.0)
    assert heur.reasons[Reason.NO_BINDING] == 1


def test_api_does_not_query_the_engine_per_packet_for_made_up_spis():
    asked = []

    def query_inbound_spi(spi):
        asked.append(spi)
        return None

    ha = HaTunnel(HA, BindingTable(), ApiClassifier(lambda s: None, query_inbound_spi))
    mn_e = mn_engine()
    base = bytearray(esp_of(mn_e, ping(HOA, CN)))
    for i in range(500):
        base[40:44] = (0x5000 + i).to_bytes(4, "big")
        ha.inbound_udp(bytes(base), ATTACKER, 1000 + i, 10.0 + i / 1000)  # half a second
    assert len(asked) == INBOUND_QUERY_BUDGET and ha.classifier.budget_skips == 500 - INBOUND_QUERY_BUDGET


def test_ha_refuses_packets_not_for_it():
    ha = HaTunnel(HA, BindingTable(), HeuristicClassifier())
    mn_e = mn_engine()
    other = bytearray(esp_of(mn_e, ping(HOA, CN)))
    other[24:40] = IPv6Address(CN).packed  # would be relayed to a third party
    assert ha.inbound_udp(bytes(other), NAT_PUB, 1, 1.0) is TunnelDrop.WRONG_ADDRESS
    ll = bytearray(esp_of(mn_e, ping(HOA, CN)))
    ll[8:24] = IPv6Address("fe80::1").packed
    assert ha.inbound_udp(bytes(ll), NAT_PUB, 1, 1.0) is TunnelDrop.WRONG_ADDRESS
    assert len(ha.records) == 0


# --- the HA's packets -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_ha_ba_goes_in_udp_without_routing_header_even_when_rejecting(mode):
    mn_e, ha_e = mn_engine(), ha_engine()
    table = BindingTable()
    ha = HaTunnel(HA, table, make_classifier(mode, "ha", ha_e.query_outbound, ha_e.query_inbound_spi))
    ha.expect_binding_ack(HOA, Ipv4Endpoint(IPv4Address(NAT_PUB), 50000))
    refused = BindingAck(BaStatus.UDP_ENCAPSULATION_REFUSED, seq=1, lifetime=0,
                         options=(NatDetection(False, 0xFFFFFFFF),))
    esp = esp_of(ha_e, push_mh_packet(refused, HA, HOA))
    packet, path = only(ha.outbound(esp, 1.0))
    assert packet == esp and IPv6ExtHdrRouting not in IPv6(packet)
    assert path == Ipv4Path(Encap.UDP, NAT_PUB, 50000)
    _, ba = pull_mh_packet(mn_e.process_inbound(packet, 1.0))
    assert ba.status == BaStatus.UDP_ENCAPSULATION_REFUSED


def test_ha_without_an_announced_ba_uses_the_bindings_endpoint_in_udp():
    ha_e = ha_engine()
    table = BindingTable()
    ha = HaTunnel(HA, table, make_classifier("api", "ha", ha_e.query_outbound, ha_e.query_inbound_spi))
    table.set_ipv4(HOA, PUB, udp_source=Ipv4Endpoint(IPv4Address(PUB), MN_PORT), udp_encap=False)
    ba = esp_of(ha_e, push_mh_packet(BindingAck(BaStatus.ACCEPTED, seq=2, lifetime=60), HA, HOA))
    assert only(ha.outbound(ba, 1.0))[1] == Ipv4Path(Encap.UDP, PUB, MN_PORT)
    assert only(ha.outbound(esp_of(ha_e, ping(CN, HOA)), 1.0))[1] == Ipv4Path(Encap.IPIP, PUB)


def test_binding_table_follows_ipv4_bindings():
    table = BindingTable()
    hoa, h16 = IPv6Address(HOA), IPv6Address(HOA).packed
    nat = Ipv4Endpoint(IPv4Address(NAT_PUB), 50000)
    e1 = BindingCacheEntry(hoa, IPv4Address(PRIV), 1, 60, 0.0, 240.0, udp_source=nat, nat_detected=True,
                           udp_encap=True)
    e2 = BindingCacheEntry(hoa, IPv4Address(PUB), 2, 60, 0.0, 240.0,
                           udp_source=Ipv4Endpoint(IPv4Address(PUB), MN_PORT))
    e3 = BindingCacheEntry(hoa, IPv6Address("2001:db8:f::100"), 3, 60, 0.0, 240.0)
    table.apply([BindingCreated(hoa, e1.coa, e1)])
    assert table.lookup(h16) == Ipv4Path(Encap.UDP, NAT_PUB, 50000)
    assert (table.endpoint(h16), table.ipip_peer(h16)) == ((NAT_PUB, 50000), None)
    table.apply([BindingUpdated(hoa, e1.coa, e2.coa, e2, e1)])
    assert table.lookup(h16) == Ipv4Path(Encap.IPIP, PUB)
    assert (table.endpoint(h16), table.ipip_peer(h16)) == ((PUB, MN_PORT), PUB)
    assert table.ba_path(h16) == udp_path(PUB, MN_PORT)
    table.apply([BindingUpdated(hoa, e2.coa, e3.coa, e3, e2)])
    assert table.lookup(h16) == e3.coa.packed and table.endpoint(h16) is None
    table.apply([BindingDeleted(hoa, e3.coa, DeleteReason.DEREGISTERED, e3)])
    assert table.lookup(h16) is None and len(table) == 0


# --- records (sans-I/O) -------------------------------------------------------------------------------------------


def test_records_expire_and_stay_bounded():
    rec = OuterRecords(lifetime=5.0, per_hoa=3, max_hoas=2)
    h1, h2, h3 = b"\x01" * 16, b"\x02" * 16, b"\x03" * 16
    for i in range(5):
        rec.record(h1, 1, i, ("192.0.2.1", 1000 + i), float(i))
    assert [c.seq for c in rec.pending(h1)] == [2, 3, 4] and rec.counts["discarded"] == 2
    rec.record(h2, 1, 0, ("192.0.2.2", 1), 0.0)
    rec.record(h3, 1, 0, ("192.0.2.3", 1), 0.0)  # a third HoA evicts the oldest
    assert rec.pending(h1) == [] and rec.counts["evicted"] == 3
    assert rec.take(h2, 10.0).candidate is None and rec.counts["expired"] == 1  # stale: never taken
    assert rec.expire(100.0) == 1 and len(rec) == 0


def test_records_take_prefers_the_authenticated_sequence_number():
    rec = OuterRecords()
    hoa = b"\x01" * 16
    rec.record(hoa, 0x1001, 7, ("192.0.2.1", 1), 1.0)  # genuine
    rec.record(hoa, 0x1001, 7, ("192.0.2.9", 9), 1.1)  # a replayed copy, later
    rec.record(hoa, 0x1001, 8, ("192.0.2.8", 8), 1.2)  # forged, later still
    taken = rec.take(hoa, 1.5, lambda spi: 7)
    assert taken == (rec_candidate := taken.candidate, "seq") and rec_candidate.endpoint == ("192.0.2.1", 1)
    rec.record(hoa, 0x1001, 9, ("192.0.2.1", 1), 2.0)
    assert rec.take(hoa, 2.5, lambda spi: None).how == "latest"


# --- wire helpers and bad input ----------------------------------------------------------------------------------


def test_push_udp4_and_ipip_headers_parse_back():
    esp = esp_of(mn_engine(), ping(HOA, CN))
    from scapy.layers.inet import IP, UDP

    pkt = IP(push_udp4(PRIV, MN_PORT, HA4, DSMIPV6_PORT, esp))
    assert (pkt.src, pkt.dst, pkt[UDP].sport, pkt[UDP].dport) == (PRIV, HA4, MN_PORT, DSMIPV6_PORT)
    raw = push_udp4(PRIV, MN_PORT, HA4, DSMIPV6_PORT, esp)
    pkt2 = IP(raw)
    del pkt2.chksum, pkt2[UDP].chksum
    assert bytes(pkt2.__class__(bytes(pkt2))) == raw  # scapy computes the same checksums
    outer = pull_ipv4_outer(push_ipip(PUB, HA4, esp))
    assert (outer.src, outer.dst, outer.payload) == (PUB, HA4, esp)
    for bad in (b"", b"\x45" * 10, push_ipip(PUB, HA4, esp)[:19]):
        with pytest.raises(Exception, match="IPv4"):
            pull_ipv4_outer(bad)


def _mangled() -> st.SearchStrategy[bytes]:
    mn_e = mn_engine()
    real = [esp_of(mn_e, bu_v4(1, PRIV)), esp_of(mn_e, ping(HOA, CN)), push_ipip(PUB, HA4, esp_of(mn_e, ping(HOA, CN)))]
    cut = st.tuples(st.sampled_from(real), st.integers(0, 160)).map(lambda t: t[0][: t[1]])
    flip = st.tuples(st.sampled_from(real), st.integers(0, 99), st.integers(0, 255)).map(
        lambda t: t[0][: t[1]] + bytes([t[2]]) + t[0][t[1] + 1 :])
    return st.one_of(st.binary(max_size=120), cut, flip)


@settings(max_examples=300, deadline=None)
@given(data=_mangled())
def test_bad_input_on_the_ipv4_sockets_is_a_drop_or_a_checked_packet_never_an_exception(data):
    table = BindingTable()
    table.set_ipv4(HOA, PUB, udp_source=Ipv4Endpoint(IPv4Address(PUB), MN_PORT), udp_encap=False)
    for mode in MODES:
        ha = HaTunnel(HA, table, HeuristicClassifier() if mode == "heuristic" else ApiClassifier(
            lambda s: None, lambda spi: None))
        mn = MnTunnel(HOA, HA, HeuristicClassifier(), ha_ipv4=HA4)
        for got in (ha.inbound_udp(data, ATTACKER, 1, 0.0), ha.inbound_ipip(data, 0.0),
                    mn.inbound_udp(data, HA4, DSMIPV6_PORT, 0.0), mn.inbound_ipip(data, 0.0)):
            assert isinstance(got, (bytes, TunnelDrop))
            if isinstance(got, bytes):
                assert got[0] >> 4 == 6 and IPv6(got).nh in (50, 0, 43, 60)
