"""The tunnel module (mobility/tunnel.py) between two real engines, with scapy as the oracle.

The MN and the HA each run ``bits.engine`` with the same SAs: BU/BA in transport-mode SAs selected
by MH type, payload in a tunnel-mode SA HoA <-> HA (docs/mobility-design.md). Packets go
MN engine -> MnTunnel.outbound -> (wire) -> HaTunnel.inbound -> HA engine, and back
HA engine -> HaTunnel.outbound -> (wire) -> MnTunnel.inbound -> MN engine. scapy checks what is on
the wire; the peer engine decrypting proves the ESP bytes were left alone.
"""

from __future__ import annotations

import ipaddress
import itertools

import pytest
from scapy.layers.inet6 import (
    HAO,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import ESP

from bits.engine import Engine, build_engine
from bits.setkey import parse_setkey
from bits.verdict import Drop
from mobility.binding import BindingCacheEntry, BindingCreated, BindingDeleted, BindingUpdated, DeleteReason
from mobility.constants import BaStatus, BuFlag
from mobility.ipv6ext import pull_mh_packet, push_mh_packet
from mobility.mh import BindingAck, BindingUpdate
from mobility.options import AlternateCareOfAddress
from mobility.tunnel import (
    NEUTRAL_OPTION_TYPE,
    ApiClassifier,
    BindingTable,
    ClassifyMode,
    HaTunnel,
    HeuristicClassifier,
    Kind,
    MnState,
    MnTunnel,
    Reason,
    Route,
    SpiLearner,
    TunnelDrop,
    make_classifier,
)

HOA, HA, CN = "2001:db8:1::100", "2001:db8:1::1", "2001:db8:c::1"
COA1, COA2 = "2001:db8:f::100", "2001:db8:e::100"


def _p(addr: str) -> bytes:
    return ipaddress.IPv6Address(addr).packed




def _rand() -> callable:
    counter = itertools.count()
    return lambda n: bytes((next(counter) + i) & 0xFF for i in range(n))


def mn_engine() -> Engine:
    return build_engine(parse_setkey(SAS + MN_SPD, local_addresses=[HOA]), rand=_rand(), now=0.0)


def ha_engine() -> Engine:
    return build_engine(parse_setkey(SAS + HA_SPD, local_addresses=[HA]), rand=_rand(), now=0.0)


def _spi_query(engine: Engine):
    return engine.query_outbound


def make_mn(mode: str, engine: Engine, **kw) -> MnTunnel:
    return MnTunnel(HOA, HA, make_classifier(mode, "mn", _spi_query(engine)), **kw)


def make_ha(mode: str, engine: Engine, table: BindingTable, **kw) -> HaTunnel:
    classifier = make_classifier(mode, "ha", _spi_query(engine), engine.query_inbound_spi)
    return HaTunnel(HA, table.lookup, classifier, **kw)


def bu_packet(seq: int, coa: str) -> bytes:
    bu = BindingUpdate(seq, BuFlag.A | BuFlag.H, 60, (AlternateCareOfAddress(ipaddress.IPv6Address(coa)),))
    return push_mh_packet(bu, HOA, HA)


def ba_packet(seq: int) -> bytes:
    return push_mh_packet(BindingAck(BaStatus.ACCEPTED, seq=seq, lifetime=60), HA, HOA)


def ping(src: str, dst: str, seq: int = 0, size: int = 16) -> bytes:
    return bytes(IPv6(src=src, dst=dst) / ICMPv6EchoRequest(id=7, seq=seq, data=b"x" * size))


def esp_of(engine: Engine, packet: bytes) -> bytes:
    out = engine.process_outbound(packet, 1.0)
    assert not isinstance(out, Drop), out
    return out


def only(out: list[tuple[bytes, Route]], route: Route = Route.WIRE) -> bytes:
    assert len(out) == 1 and out[0][1] is route, out
    return out[0][0]


def esp_bytes(packet: bytes) -> bytes:
    return bytes(IPv6(packet)[ESP])


@pytest.fixture
def nodes():
    """Both engines, a binding table, and a registered MN (CoA1) -- in heuristic mode."""
    mn_e, ha_e, table = mn_engine(), ha_engine(), BindingTable()
    return mn_e, ha_e, table


# --- the MN's Binding Update --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["api", "heuristic"])
def test_bu_leaves_from_coa_with_home_address_option_and_ha_engine_accepts_it(mode, nodes):
    mn_e, ha_e, table = nodes
    mn, ha = make_mn(mode, mn_e), make_ha(mode, ha_e, table)
    esp = esp_of(mn_e, bu_packet(1, COA1))
    mn.expect_binding_update(COA1)
    wire = only(mn.outbound(esp, 1.0))

    pkt = IPv6(wire)
    assert pkt.src == COA1 and pkt.dst == HA
    dst_opts = pkt[IPv6ExtHdrDestOpt]
    assert [o.hoa for o in dst_opts.options if isinstance(o, HAO)] == [HOA]
    assert dst_opts.nh == 50 and pkt[ESP].spi == SPI_BU
    assert esp_bytes(wire) == esp_bytes(esp)  # ESP untouched
    assert mn.counts["out_signal"] == 1

    fixed = ha.inbound(wire, 1.0)
    assert isinstance(fixed, bytes) and len(fixed) == len(wire)
    seen = IPv6(fixed)
    assert seen.src == HOA  # RFC 6275 9.3.1 swap
    opt = fixed[40 + 6]
    assert opt == NEUTRAL_OPTION_TYPE and opt >> 6 == 0  # "skip if unknown"
    assert fixed[40 + 8 : 40 + 24] == _p(COA1)  # the option now holds the CoA
    assert ha.seen_coa(HOA) == _p(COA1)

    inner = ha_e.process_inbound(fixed, 1.0)
    assert not isinstance(inner, Drop), inner
    loc, msg = pull_mh_packet(inner)  # checksum verified with source HoA
    assert isinstance(msg, BindingUpdate) and msg.seq == 1 and str(loc.src) == HOA


def test_bu_needs_a_coa(nodes):
    mn_e, _, _ = nodes
    mn = make_mn("api", mn_e)
    mn.at_home = False  # away but never told a CoA
    assert mn.outbound(esp_of(mn_e, bu_packet(1, COA1)), 1.0) == []
    assert mn.drops[TunnelDrop.NO_COA] == 1


# --- the HA's Binding Acknowledgement ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["api", "heuristic"])
def test_ba_gets_type2_routing_header_and_mn_engine_accepts_it(mode, nodes):
    mn_e, ha_e, table = nodes
    mn, ha = make_mn(mode, mn_e), make_ha(mode, ha_e, table)
    mn.expect_binding_update(COA1)
    table.set(HOA, COA1)
    ha.expect_binding_ack(HOA, COA1)
    esp = esp_of(ha_e, ba_packet(1))
    wire = only(ha.outbound(esp, 1.0))

    pkt = IPv6(wire)
    assert pkt.src == HA and pkt.dst == COA1
    rh = pkt[IPv6ExtHdrRouting]
    assert rh.type == 2 and rh.segleft == 1 and rh.addresses == [HOA] and rh.nh == 50
    assert pkt[ESP].spi == SPI_BA and esp_bytes(wire) == esp_bytes(esp)

    fixed = mn.inbound(wire, 1.0)
    assert isinstance(fixed, bytes) and len(fixed) == len(wire) - 24
    assert IPv6(fixed).dst == HOA and IPv6ExtHdrRouting not in IPv6(fixed)
    assert mn.counts["in_rh2_removed"] == 1
    inner = mn_e.process_inbound(fixed, 1.0)
    assert not isinstance(inner, Drop), inner
    _, msg = pull_mh_packet(inner)
    assert isinstance(msg, BindingAck) and msg.seq == 1


def test_ba_goes_to_the_bu_source_even_without_a_binding(nodes):
    """A rejected BU (no binding) is still answered at the CoA it came from (RFC 6275 9.5.4)."""
    mn_e, ha_e, table = nodes
    mn, ha = make_mn("heuristic", mn_e), make_ha("heuristic", ha_e, table)
    mn.expect_binding_update(COA2)
    ha.inbound(only(mn.outbound(esp_of(mn_e, bu_packet(9, COA2)), 1.0)), 1.0)  # records CoA2
    wire = only(ha.outbound(esp_of(ha_e, ba_packet(9)), 1.0))
    assert IPv6(wire).dst == COA2 and IPv6(wire)[IPv6ExtHdrRouting].addresses == [HOA]


def test_ba_for_a_home_address_at_home_is_not_looped(nodes):
    _, ha_e, table = nodes
    ha = make_ha("api", ha_e, table)
    ha.expect_binding_ack(HOA, HOA)  # de-registration from home: the BA must not enter the TUN
    assert ha.outbound(esp_of(ha_e, ba_packet(3)), 1.0) == []
    assert ha.drops[TunnelDrop.LOOP] == 1


def test_mn_refuses_a_routing_header_for_another_home_address(nodes):
    mn_e, ha_e, table = nodes
    mn, ha = make_mn("api", mn_e), make_ha("api", ha_e, table)
    mn.expect_binding_update(COA1)
    table.set(HOA, COA1)
    wire = bytearray(only(ha.outbound(esp_of(ha_e, ba_packet(1)), 1.0)))
    wire[40 + 8 + 15] ^= 1  # the RH2 address is no longer our HoA
    assert mn.inbound(bytes(wire), 1.0) is TunnelDrop.BAD_RH2


# --- data, both ways (Req #1) ----------------------------------------------------------------------------


def register(mn: MnTunnel, coa: str) -> None:
    mn.expect_binding_update(coa)
    mn.binding_acknowledged(coa)


@pytest.mark.parametrize("mode", ["api", "heuristic"])
def test_data_round_trip_through_both_tunnels(mode, nodes):
    mn_e, ha_e, table = nodes
    mn, ha = make_mn(mode, mn_e), make_ha(mode, ha_e, table)
    register(mn, COA1)
    table.set(HOA, COA1)

    request = ping(HOA, CN, 1)
    esp = esp_of(mn_e, request)
    wire = only(mn.outbound(esp, 2.0))
    assert IPv6(wire).src == COA1 and IPv6(wire).dst == HA and IPv6ExtHdrDestOpt not in IPv6(wire)
    assert esp_bytes(wire) == esp_bytes(esp)
    assert ha.inbound(wire, 2.0) is None  # no Home Address option: nothing to do
    assert ha_e.process_inbound(wire, 2.0) == request

    reply = ping(CN, HOA, 2)
    esp = esp_of(ha_e, reply)
    wire = only(ha.outbound(esp, 2.0))
    assert IPv6(wire).src == HA and IPv6(wire).dst == COA1  # Req #1: HoA -> CoA after IPsec
    assert esp_bytes(wire) == esp_bytes(esp)
    fixed = mn.inbound(wire, 2.0)
    assert IPv6(fixed).dst == HOA
    assert mn_e.process_inbound(fixed, 2.0) == reply


def test_ha_without_binding_drops_data(nodes):
    _, ha_e, table = nodes
    ha = make_ha("api", ha_e, table)
    assert ha.outbound(esp_of(ha_e, ping(CN, HOA)), 1.0) == []
    assert ha.drops[TunnelDrop.NO_BINDING] == 1


def test_ha_follows_the_binding_table(nodes):
    _, ha_e, table = nodes
    ha = make_ha("api", ha_e, table)
    table.set(HOA, COA1)
    assert IPv6(only(ha.outbound(esp_of(ha_e, ping(CN, HOA)), 1.0))).dst == COA1
    table.set(HOA, COA2)
    assert IPv6(only(ha.outbound(esp_of(ha_e, ping(CN, HOA)), 1.0))).dst == COA2


def test_mn_inbound_leaves_other_packets_alone(nodes):
    mn_e, ha_e, table = nodes
    mn = make_mn("api", mn_e)
    register(mn, COA1)
    assert mn.inbound(ping(CN, COA1), 1.0) is None  # not from the HA
    assert mn.inbound(ping(HA, COA1), 1.0) is None  # from the HA but not ESP
    assert mn.inbound(ping(HA, COA2), 1.0) is None  # not one of our CoAs
    assert mn.inbound(b"\x60", 1.0) is None
    mn.returned_home()
    table.set(HOA, COA1)
    assert mn.inbound(only(make_ha("api", ha_e, table).outbound(esp_of(ha_e, ping(CN, HOA)), 1.0)), 1.0) is None


# --- Req #3: BU from the new CoA, data from the old one until the BA ----------------------------------------------


@pytest.mark.parametrize("mode", ["api", "heuristic"])
def test_data_flood_with_one_bu_in_the_middle(mode, nodes):
    mn_e, _, _ = nodes
    mn = make_mn(mode, mn_e, tracing=True)
    register(mn, COA1)
    sources = []
    for i in range(50):
        sources.append(IPv6(only(mn.outbound(esp_of(mn_e, ping(HOA, CN, i)), 3.0))).src)
    assert set(sources) == {COA1}

    mn.expect_binding_update(COA2)  # moved: BU from CoA2 in flight
    assert mn.state is MnState.MOVING
    during = []
    for i in range(50, 100):
        during.append(only(mn.outbound(esp_of(mn_e, ping(HOA, CN, i)), 3.1)))
        if i == 75:
            bu = only(mn.outbound(esp_of(mn_e, bu_packet(2, COA2)), 3.1))
    assert {IPv6(p).src for p in during} == {COA1}  # no data packet left via the new CoA
    assert not any(IPv6ExtHdrDestOpt in IPv6(p) for p in during)
    assert IPv6(bu).src == COA2 and IPv6(bu)[IPv6ExtHdrDestOpt].options[-1].hoa == HOA

    mn.binding_acknowledged(COA2)
    assert mn.state is MnState.REGISTERED
    after = only(mn.outbound(esp_of(mn_e, ping(HOA, CN, 200)), 3.2))
    assert IPv6(after).src == COA2

    signals = [e for e in mn.drain_events() if e.kind is Kind.SIGNAL]
    assert len(signals) == 1 and signals[0].spi == SPI_BU and signals[0].coa == _p(COA2)
    assert signals[0].mode is ClassifyMode(mode)
    expected = Reason.API_SIGNAL_SPI if mode == "api" else Reason.DIFFERS_FROM_DATA
    assert signals[0].reason is expected
    assert mn.counts["out_signal"] == 1 and mn.counts["out_data"] == 101


def test_data_waits_for_the_first_ba(nodes):
    """First registration: no acknowledged CoA yet, so data is dropped (counted), the BU leaves."""
    mn_e, _, _ = nodes
    mn = make_mn("api", mn_e)
    mn.expect_binding_update(COA1)
    assert mn.state is MnState.REGISTERING
    assert mn.outbound(esp_of(mn_e, ping(HOA, CN)), 1.0) == []
    assert mn.drops[TunnelDrop.NO_COA] == 1
    bu = only(mn.outbound(esp_of(mn_e, bu_packet(1, COA1)), 1.0))
    assert IPv6(bu).src == COA1 and IPv6ExtHdrDestOpt in IPv6(bu)


def has_hao(out: list[tuple[bytes, Route]]) -> bool:
    return IPv6ExtHdrDestOpt in IPv6(only(out))


def test_heuristic_untaught_bu_first_is_locked(nodes):
    """Nothing learnt yet: the packet right after the announcement is the BU, and its SPI is locked."""
    mn_e, _, _ = nodes
    mn = make_mn("heuristic", mn_e)
    mn.expect_binding_update(COA1)
    assert has_hao(mn.outbound(esp_of(mn_e, bu_packet(1, COA1)), 1.0))
    assert mn.reasons[Reason.FIRST_WHILE_EXPECTING] == 1 and not mn.expecting
    assert mn.classifier.learners[_p(HA)].signal_spi == SPI_BU
    mn.binding_acknowledged(COA1)
    assert not has_hao(mn.outbound(esp_of(mn_e, ping(HOA, CN, 2)), 2.0))
    refresh = mn.outbound(esp_of(mn_e, bu_packet(2, COA1)), 300.0)  # not even announced
    assert has_hao(refresh) and mn.reasons[Reason.LOCKED_SIGNAL_SPI] == 1


def test_heuristic_untaught_data_slipping_before_the_bu_heals_at_the_retransmission(nodes):
    """The corner case of the heuristic: nothing learnt, and a data packet squeezes in between the
    announcement and the BU. It is taken for the BU (and still arrives); the BU goes as data and is
    lost. Data faster than BUs may be sent becomes a data SPI, and the retransmitted BU is found."""
    mn_e, _, _ = nodes
    mn = make_mn("heuristic", mn_e)
    mn.expect_binding_update(COA1)
    assert has_hao(mn.outbound(esp_of(mn_e, ping(HOA, CN, 0)), 1.0))  # the wrong guess
    assert mn.outbound(esp_of(mn_e, bu_packet(1, COA1)), 1.0) == []  # taken for data: no CoA yet
    assert mn.drops[TunnelDrop.NO_COA] == 1
    for i in range(1, 4):
        mn.outbound(esp_of(mn_e, ping(HOA, CN, i)), 1.0 + i / 100)
    assert mn.reasons[Reason.TOO_FAST] == 1
    mn.expect_binding_update(COA1)  # retransmission after INITIAL_BINDACK_TIMEOUT
    assert has_hao(mn.outbound(esp_of(mn_e, bu_packet(2, COA1)), 2.5))
    assert mn.reasons[Reason.DIFFERS_FROM_DATA] == 1


def test_heuristic_retransmitted_bus_stay_bus(nodes):
    mn_e, _, _ = nodes
    mn = make_mn("heuristic", mn_e)
    for i, now in enumerate((0.0, 1.5, 4.5, 10.5)):  # RFC 6275 11.8 back-off
        mn.expect_binding_update(COA1)
        assert has_hao(mn.outbound(esp_of(mn_e, bu_packet(i, COA1)), now))


def test_heuristic_wrong_lock_is_undone_by_the_rate_limit():
    """A second data SA showing up while a BU is expected is taken for the BU and locked; more
    packets a second than RFC 6275 11.8 allows BUs make it a data SPI."""
    learner = SpiLearner()
    assert [learner.classify(7, False, i / 100)[1] for i in range(5)] == [Reason.NOT_EXPECTING] * 3 + [
        Reason.TOO_FAST, Reason.DATA_SPI]
    assert learner.classify(9, True, 5.0) == (True, Reason.DIFFERS_FROM_DATA)
    got = [learner.classify(9, False, 5.0 + i / 100) for i in range(1, 5)]
    assert got == [(True, Reason.LOCKED_SIGNAL_SPI)] * 2 + [(False, Reason.TOO_FAST), (False, Reason.DATA_SPI)]
    assert learner.signal_spi is None and learner.data_spis == {7, 9}
    assert learner.classify(1, True, 6.0) == (True, Reason.DIFFERS_FROM_DATA)


def test_heuristic_bus_in_a_burst_stay_bus():
    """RFC 6275 11.8 allows MAX_UPDATE_RATE (3) BUs within a second (fast movement)."""
    learner = SpiLearner()
    assert [learner.classify(5, True, 1.0 + i / 10)[0] for i in range(3)] == [True, True, True]
    assert 5 not in learner.data_spis


def test_api_asks_once_not_per_packet_and_again_after_sad_change(nodes):
    mn_e, _, _ = nodes
    mn = make_mn("api", mn_e)
    register(mn, COA1)
    for i in range(200):
        mn.outbound(esp_of(mn_e, ping(HOA, CN, i)), 1.0)
    classifier = mn.classifier
    assert isinstance(classifier, ApiClassifier) and classifier.queries == 2  # BU and MPS selectors
    mn.sad_changed()
    mn.outbound(esp_of(mn_e, ping(HOA, CN, 999)), 1.0)
    assert classifier.queries == 4


def test_api_only_counts_transport_mode_answers(nodes):
    """No MPS policy here: its selector falls through to the payload entry, whose tunnel-mode SA
    must not be taken for signalling."""
    mn_e, _, _ = nodes
    classifier = ApiClassifier(mn_e.query_outbound)
    assert classifier.outbound(_p(HOA), _p(HA), SPI_BU, False, 0.0) == (True, Reason.API_SIGNAL_SPI)
    assert classifier.outbound(_p(HOA), _p(HA), SPI_MN_DATA, False, 0.0) == (False, Reason.API_OTHER_SPI)


def test_api_unreachable_falls_back_and_retries_later(nodes):
    from mobility.tunnel import EngineQueryError

    mn_e, _, _ = nodes
    calls = []

    def broken(sel):
        calls.append(sel)
        raise EngineQueryError("no control socket")

    mn = MnTunnel(HOA, HA, ApiClassifier(broken, retry_interval=5.0))
    register(mn, COA1)
    for i in range(20):
        only(mn.outbound(esp_of(mn_e, ping(HOA, CN, i)), 10.0))
    mn.expect_binding_update(COA2)
    bu = only(mn.outbound(esp_of(mn_e, bu_packet(2, COA2)), 10.0))
    assert IPv6(bu).src == COA2 and IPv6ExtHdrDestOpt in IPv6(bu)  # the heuristic decided
    assert len(calls) == 1 and mn.reasons[Reason.API_UNAVAILABLE] == 21
    mn.outbound(esp_of(mn_e, ping(HOA, CN, 50)), 15.0)
    assert len(calls) == 2


def test_heuristic_never_queries(nodes):
    mn_e, _, _ = nodes
    mn = MnTunnel(HOA, HA, HeuristicClassifier())
    register(mn, COA1)
    for i in range(5):
        mn.outbound(esp_of(mn_e, ping(HOA, CN, i)), 1.0)
    mn.expect_binding_update(COA2)
    assert IPv6(only(mn.outbound(esp_of(mn_e, ping(HOA, CN, 9)), 1.0))).src == COA1
    assert IPv6(only(mn.outbound(esp_of(mn_e, bu_packet(1, COA2)), 1.0))).src == COA2


def test_engine_sad_is_not_touched_by_a_handover(nodes):
    mn_e, ha_e, table = nodes
    mn, ha = make_mn("api", mn_e), make_ha("api", ha_e, table)

    def sas(engine):
        return [(s["spi"], s["src"], s["dst"], s["mode"]) for s in engine.status()["sas"]]

    before = sas(mn_e), sas(ha_e)
    for coa in (COA1, COA2, COA1):
        mn.expect_binding_update(coa)
        ha.inbound(only(mn.outbound(esp_of(mn_e, bu_packet(1, coa)), 1.0)), 1.0)
        mn.binding_acknowledged(coa)
        table.set(HOA, coa)
        wire = only(ha.outbound(esp_of(ha_e, ping(CN, HOA)), 1.0))
        assert IPv6(wire).dst == coa
        assert not isinstance(mn_e.process_inbound(mn.inbound(wire, 1.0), 1.0), Drop)
    assert (sas(mn_e), sas(ha_e)) == before


# --- HA inbound classification (draft 4.4.2) -------------------------------------------------------------------


def test_ha_heuristic_compares_with_the_binding(nodes):
    mn_e, ha_e, table = nodes
    mn, ha = make_mn("heuristic", mn_e), make_ha("heuristic", ha_e, table, tracing=True)
    cases = ((COA1, None, Reason.NO_BINDING), (COA1, COA1, Reason.COA_KNOWN), (COA2, COA1, Reason.COA_CHANGED))
    for now, (coa, bound, reason) in enumerate(cases):  # BUs are seconds apart (RFC 6275 11.8)
        if bound:
            table.set(HOA, bound)
        mn.expect_binding_update(coa)
        ha.inbound(only(mn.outbound(esp_of(mn_e, bu_packet(1, coa)), now)), now)
        event = ha.drain_events()[-1]
        assert event.reason is reason and event.coa == _p(coa) and event.hoa == _p(HOA)
        assert HOA in ha.status()["expecting"]


def test_ha_api_asks_the_engine_about_the_spi(nodes):
    mn_e, ha_e, table = nodes
    mn, ha = make_mn("api", mn_e), make_ha("api", ha_e, table)
    mn.expect_binding_update(COA1)
    bu = only(mn.outbound(esp_of(mn_e, bu_packet(1, COA1)), 1.0))
    ha.inbound(bu, 1.0)
    ha.inbound(bu, 1.0)
    assert ha.reasons[Reason.API_SIGNAL_SPI] == 2 and ha.classifier.queries == 1
    # a Home Address option on a packet whose SPI is not a BU SA: swapped, but no CoA recorded
    forged = bytearray(bu)
    forged[8:24] = _p(COA2)
    esp_at = 40 + 24
    forged[esp_at : esp_at + 4] = SPI_MN_DATA.to_bytes(4, "big")
    ha2 = make_ha("api", ha_e, BindingTable())
    out = ha2.inbound(bytes(forged), 1.0)
    assert IPv6(out).src == HOA and ha2.seen_coa(HOA) is None
    assert ha2.reasons[Reason.API_OTHER_SPI] == 1


def test_ha_inbound_ignores_packets_for_others(nodes):
    mn_e, ha_e, table = nodes
    mn, ha = make_mn("api", mn_e), make_ha("api", ha_e, table)
    mn.expect_binding_update(COA1)
    bu = bytearray(only(mn.outbound(esp_of(mn_e, bu_packet(1, COA1)), 1.0)))
    bu[24:40] = _p(CN)  # not addressed to the HA
    assert ha.inbound(bytes(bu), 1.0) is None
    assert ha.inbound(ping(COA1, HA), 1.0) is None


# --- cleartext in the TUN ---------------------------------------------------------------------------------------------


def test_mn_cleartext_from_hoa_fails_closed_other_sources_pass(nodes):
    mn_e, _, _ = nodes
    mn = make_mn("api", mn_e)
    register(mn, COA1)
    assert mn.outbound(ping(HOA, CN), 1.0) == [] and mn.drops[TunnelDrop.CLEARTEXT] == 1
    assert mn.outbound(ping("fe80::1", "ff02::2"), 1.0) == [] and mn.drops[TunnelDrop.LINK_LOCAL] == 1
    native = ping(COA1, CN)
    assert only(mn.outbound(native, 1.0)) == native


def test_ha_reinjects_forwarded_cleartext_for_the_engine(nodes):
    _, ha_e, table = nodes
    ha = make_ha("api", ha_e, table)
    table.set(HOA, COA1)
    forwarded = ping(CN, HOA)
    again = only(ha.outbound(forwarded, 1.0), Route.LOCAL)
    assert again[7] == forwarded[7] - 1 and again[:7] == forwarded[:7] and again[8:] == forwarded[8:]
    looping = bytearray(forwarded)
    looping[7] = 1
    assert ha.outbound(bytes(looping), 1.0) == [] and ha.drops[TunnelDrop.HOP_LIMIT] == 1
    table.delete(HOA)
    assert ha.outbound(forwarded, 1.0) == [] and ha.drops[TunnelDrop.NO_BINDING] == 1


# --- MTU and Packet Too Big ----------------------------------------------------------------------------------------------


def test_ha_answers_oversized_cleartext_with_packet_too_big(nodes):
    _, ha_e, table = nodes
    ha = make_ha("api", ha_e, table, inner_mtu=1402)
    table.set(HOA, COA1)
    big = ping(CN, HOA, size=1500)
    ptb = only(ha.outbound(big, 1.0))
    pkt = IPv6(ptb)
    assert pkt.src == HA and pkt.dst == CN and len(ptb) == 1280
    icmp = pkt[ICMPv6PacketTooBig]
    assert icmp.type == 2 and icmp.code == 0 and icmp.mtu == 1402
    claimed = icmp.cksum
    del icmp.cksum
    assert IPv6(bytes(pkt))[ICMPv6PacketTooBig].cksum == claimed  # scapy agrees on the checksum
    assert bytes(icmp.payload) == big[: 1280 - 48]
    assert ha.drops[TunnelDrop.TOO_BIG] == 1 and ha.counts["ptb"] == 1


def test_mn_bu_too_big_for_the_path_gets_packet_too_big(nodes):
    mn_e, _, _ = nodes
    mn = make_mn("api", mn_e, path_mtu=1300)
    register(mn, COA1)
    big = esp_of(mn_e, ping(HOA, CN, size=1250))
    ptb = only(mn.outbound(big, 1.0), Route.TUN)
    pkt = IPv6(ptb)
    assert pkt.dst == HOA and pkt[ICMPv6PacketTooBig].mtu == 1300
    small = esp_of(mn_e, ping(HOA, CN, size=100))
    assert IPv6(only(mn.outbound(small, 1.0))).src == COA1


# --- robustness ----------------------------------------------------------------------------------------------------------


def test_tracing_off_records_nothing(nodes):
    mn_e, _, _ = nodes
    mn = make_mn("api", mn_e)
    register(mn, COA1)
    mn.outbound(esp_of(mn_e, ping(HOA, CN)), 1.0)
    assert mn.events == [] and mn.reasons[Reason.API_OTHER_SPI] == 1


def test_trace_record_renders(nodes):
    mn_e, _, _ = nodes
    mn = make_mn("heuristic", mn_e, tracing=True)
    register(mn, COA1)
    mn.outbound(esp_of(mn_e, ping(HOA, CN)), 1.0)
    (event,) = mn.drain_events()
    assert event.to_dict() == {
        "direction": "out", "mode": "heuristic", "kind": "data", "reason": "not-expecting",
        "spi": f"{SPI_MN_DATA:#010x}", "hoa": HOA, "coa": COA1, "drop": None,
    }
    assert mn.events == []


def test_binding_table_follows_binding_cache_events():
    table = BindingTable()
    hoa, c1, c2 = (ipaddress.IPv6Address(a) for a in (HOA, COA1, COA2))
    e1 = BindingCacheEntry(hoa, c1, 1, 60, 0.0, 240.0)
    e2 = BindingCacheEntry(hoa, c2, 2, 60, 0.0, 240.0)
    table.apply([BindingCreated(hoa, c1, e1)])
    assert table.lookup(hoa.packed) == c1.packed
    table.apply([BindingUpdated(hoa, c1, c2, e2, e1)])
    assert table.lookup(hoa.packed) == c2.packed
    table.apply([BindingDeleted(hoa, c2, DeleteReason.DEREGISTERED, e2)])
    assert table.lookup(hoa.packed) is None and len(table) == 0


def test_status_is_plain_data(nodes):
    mn_e, ha_e, table = nodes
    mn = make_mn("api", mn_e)
    register(mn, COA1)
    st = mn.status()
    assert st["state"] == "registered" and st["coa"] == COA1 and st["mode"] == "api"
    assert make_ha("heuristic", ha_e, table).status()["mode"] == "heuristic"


# --- bad input never raises ------------------------------------------------------------------------------------------------

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.mipv6_sas import HA_SPD, MN_SPD, SAS, SPI_BA, SPI_BU, SPI_HA_DATA, SPI_MN_DATA
from tests.mipv6_sas import key as _key


def _mangled() -> st.SearchStrategy[bytes]:
    """Random bytes, and real tunnel packets cut short or with one octet changed."""
    mn_e, ha_e = mn_engine(), ha_engine()
    mn = make_mn("heuristic", mn_e)
    mn.expect_binding_update(COA1)
    table = BindingTable()
    table.set(HOA, COA1)
    real = [
        only(mn.outbound(esp_of(mn_e, bu_packet(1, COA1)), 0.0)),
        only(make_ha("heuristic", ha_e, table).outbound(esp_of(ha_e, ba_packet(1)), 0.0)),
        esp_of(mn_e, ping(HOA, CN)),
    ]
    cut = st.tuples(st.sampled_from(real), st.integers(0, 200)).map(lambda t: t[0][: t[1]])
    flip = st.tuples(st.sampled_from(real), st.integers(0, 139), st.integers(0, 255)).map(
        lambda t: t[0][: t[1]] + bytes([t[2]]) + t[0][t[1] + 1 :])
    return st.one_of(st.binary(max_size=120), cut, flip)


@settings(max_examples=400, deadline=None)
@given(data=_mangled())
def test_garbage_is_dropped_or_passed_never_raised(data):
    mn = MnTunnel(HOA, HA, HeuristicClassifier())
    mn.expect_binding_update(COA1)
    mn.binding_acknowledged(COA1)
    table = BindingTable()
    table.set(HOA, COA1)
    ha = HaTunnel(HA, table.lookup, HeuristicClassifier())
    for result in (mn.outbound(data, 0.0), ha.outbound(data, 0.0)):
        assert isinstance(result, list)
    for result in (mn.inbound(data, 0.0), ha.inbound(data, 0.0)):
        assert result is None or isinstance(result, (bytes, TunnelDrop))
