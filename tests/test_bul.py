"""MN BindingUpdateList (RFC 6275 11.7.1, 11.7.3, 11.8, 11.5.5): BUs, back-off, refresh, BRR, BE,
status 135, returning home, rate limit, and the transition table."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, IPv6Network

import pytest

from mobility.bul import (
    MN_TRANSITIONS,
    BindingAckTimeout,
    BindingExpired,
    BindingLost,
    BindingRefreshed,
    BindingUpdateList,
    CareOfAddressFallback,
    IgnoreReason,
    MessageIgnored,
    MnInput,
    MnState,
    MnTransitionError,
    MobileNodeConfig,
    PrefixDiscoveryNeeded,
    Registered,
    RegistrationFailed,
    ReturnedHome,
    SequenceResynchronized,
    StateChanged,
    mn_transition,
)
from mobility.constants import BaStatus, BeStatus, BuFlag
from mobility.mh import BindingAck, BindingUpdate, make_binding_error, pull_mh, verify_checksum
from mobility.options import AlternateCareOfAddress, BindingRefreshAdvice, Ipv4CareOfAddress, NatDetection

HOA = IPv6Address("2001:db8:1::100")
HA = IPv6Address("2001:db8:1::1")
V1 = IPv6Address("2001:db8:a::100")
V2 = IPv6Address("2001:db8:b::100")


def seq_source(value: int):
    return lambda n: value.to_bytes(n, "big")


def make(seq0: int = 100, **kw) -> BindingUpdateList:
    kw.setdefault("lifetime", 60.0)
    return BindingUpdateList(MobileNodeConfig(hoa=HOA, ha=HA, **kw), rand=seq_source(seq0))


def ack_for(bul: BindingUpdateList, status: int = 0, lifetime: int | None = None, options=()) -> BindingAck:
    bu = bul.outstanding
    return BindingAck(status, seq=bu.seq, lifetime=bu.lifetime if lifetime is None else lifetime, options=options)


def run_until(bul: BindingUpdateList, end: float):
    """Fire timers up to ``end``; return [(time, BU)] sent and all events."""
    sent, events = [], []
    while (t := bul.next_timer()) is not None and t <= end:
        msgs, evs = bul.handle_timer(t)
        sent += [(t, m.bu) for m in msgs]
        events += evs
    return sent, events


def bound(now: float = 0.0, **kw) -> BindingUpdateList:
    bul = make(**kw)
    bul.movement(V1, now)
    bul.handle_binding_ack(ack_for(bul), now)
    assert bul.state is MnState.BOUND
    return bul


# --- the Binding Update ---------------------------------------------------------------------------


def test_first_bu_fields_and_wire():
    bul = make(seq0=4242)
    msgs, events = bul.movement(V1, 0.0)
    assert events == [StateChanged(MnState.HOME, MnState.REGISTERING, MnInput.MOVED_AWAY)]
    (out,) = msgs
    assert out.bu == BindingUpdate(4242, BuFlag.A | BuFlag.H, 15, (AlternateCareOfAddress(V1),))
    assert (out.src, out.hoa, out.ha, out.home_address_option, out.udp_to) == (V1, HOA, HA, True, None)
    wire = out.push()
    assert pull_mh(wire) == out.bu and verify_checksum(wire, HOA, HA)  # pseudo-header src = HoA


def test_k_and_l_flags_and_lifetime_capped_by_coa_lifetime():
    bul = make(key_mgmt_mobility=True, link_local_compat=True, lifetime=600.0)
    (out,), _ = bul.movement(V1, 10.0, coa_valid_until=50.0)
    assert out.bu.flags == BuFlag.A | BuFlag.H | BuFlag.K | BuFlag.L
    assert out.bu.lifetime == 10  # 40 s left on the CoA
    (out,), _ = make().movement(V2, 10.0, coa_valid_until=11.0)
    assert out.bu.lifetime == 1  # never 0: that would be a de-registration


# --- retransmission back-off (11.8) -------------------------------------------------------------


def test_first_registration_backoff_schedule_exact():
    bul = make(seq0=10)
    bul.movement(V1, 0.0)
    sent, events = run_until(bul, 200.0)
    assert [t for t, _ in sent] == [1.5, 4.5, 10.5, 22.5, 46.5, 78.5, 110.5, 142.5, 174.5]
    assert [e.timeout for e in events] == [3.0, 6.0, 12.0, 24.0, 32.0, 32.0, 32.0, 32.0, 32.0]
    assert [bu.seq for _, bu in sent] == list(range(11, 20))  # every retransmission a new number
    assert [e.seq for e in events] == list(range(10, 19)) and [e.attempt for e in events] == list(range(1, 10))


def test_reregistration_backoff_starts_at_1s():
    bul = bound(now=0.0)
    msgs, _ = bul.movement(V2, 5.0)
    assert bul.state is MnState.REFRESHING and msgs[0].bu.options == (AlternateCareOfAddress(V2),)
    sent, _ = run_until(bul, 5.0 + 59)
    assert [t - 5.0 for t, _ in sent][:5] == [1.0, 3.0, 7.0, 15.0, 31.0]


def test_sequence_wraps_65535_to_0():
    bul = make(seq0=65534)
    (out,), _ = bul.movement(V1, 0.0)
    sent, _ = run_until(bul, 5.0)
    assert [out.bu.seq] + [bu.seq for _, bu in sent] == [65534, 65535, 0]
    bul.handle_binding_ack(ack_for(bul), 5.0)
    assert bul.state is MnState.BOUND and bul.next_seq == 1


# --- Binding Acknowledgements (11.7.3) ----------------------------------------------------------


def test_accepted_ba_binds_and_arms_refresh_and_expiry_from_send_time():
    bul = make()
    bul.movement(V1, 0.0)
    run_until(bul, 2.0)  # one retransmission at 1.5 s: its send time counts
    msgs, events = bul.handle_binding_ack(ack_for(bul, lifetime=10), 2.0)  # 40 s < 60 s asked
    assert msgs == [] and events[-1] == Registered(V1, 40, None)
    b = bul.binding
    assert (b.coa, b.lifetime, b.sent_at, b.expires, b.refresh_at) == (V1, 40, 1.5, 41.5, 1.5 + 32.0)
    assert bul.next_timer() == 33.5


def test_ba_with_other_seq_or_without_outstanding_bu_is_ignored():
    bul = make(seq0=7)
    bul.movement(V1, 0.0)
    _, events = bul.handle_binding_ack(BindingAck(0, seq=6, lifetime=15), 0.1)
    assert events == [MessageIgnored("BA", IgnoreReason.SEQ_MISMATCH)] and bul.state is MnState.REGISTERING
    _, events = make().handle_binding_ack(BindingAck(0, seq=1, lifetime=15), 0.0)
    assert events == [MessageIgnored("BA", IgnoreReason.NO_OUTSTANDING_BU)]


def test_status_1_asks_for_prefix_discovery():
    bul = make()
    bul.movement(V1, 0.0)
    _, events = bul.handle_binding_ack(ack_for(bul, status=1), 0.0)
    assert PrefixDiscoveryNeeded() in events and bul.state is MnState.BOUND


def test_refresh_advice_brings_refresh_forward():
    bul = make()
    bul.movement(V1, 0.0)
    bul.handle_binding_ack(ack_for(bul, lifetime=15, options=(BindingRefreshAdvice(5),)), 0.0)
    assert bul.binding.refresh_at == 20.0


def test_status_135_resynchronises_and_resends_at_once():
    bul = make(seq0=5)
    bul.movement(V1, 0.0)
    msgs, events = bul.handle_binding_ack(BindingAck(BaStatus.SEQ_OUT_OF_WINDOW, seq=900), 0.2)
    assert SequenceResynchronized(900) in events and [m.bu.seq for m in msgs] == [901]
    assert bul.state is MnState.REGISTERING
    bul.handle_binding_ack(ack_for(bul), 0.3)
    assert bul.state is MnState.BOUND


def test_status_135_with_65535_wraps_to_0():
    bul = make()
    bul.movement(V1, 0.0)
    msgs, _ = bul.handle_binding_ack(BindingAck(BaStatus.SEQ_OUT_OF_WINDOW, seq=65535), 0.1)
    assert msgs[0].bu.seq == 0


def test_rejection_fails_and_stops_until_next_movement():
    bul = make()
    bul.movement(V1, 0.0)
    msgs, events = bul.handle_binding_ack(ack_for(bul, status=BaStatus.ADMIN_PROHIBITED), 0.5)
    assert msgs == [] and RegistrationFailed(129, V1) in events
    assert bul.state is MnState.FAILED and bul.next_timer() is None and bul.binding is None
    msgs, _ = bul.movement(V1, 10.0)  # same CoA again: retry from FAILED
    assert len(msgs) == 1 and bul.state is MnState.REGISTERING


# --- refresh, expiry, BRR, BE ---------------------------------------------------------------------


def test_refresh_before_lifetime_runs_out():
    bul = bound(now=0.0)  # 60 s granted, refresh at 48 s
    assert bul.next_timer() == 48.0
    sent, events = run_until(bul, 48.0)
    assert [t for t, _ in sent] == [48.0] and bul.state is MnState.REFRESHING
    assert sent[0][1].options == (AlternateCareOfAddress(V1),)
    _, events = bul.handle_binding_ack(ack_for(bul), 48.2)
    assert events[-1] == BindingRefreshed(V1, 60) and bul.binding.expires == 108.0


def test_unanswered_refresh_runs_into_expiry_and_keeps_trying():
    bul = bound(now=0.0)
    sent, events = run_until(bul, 60.0)
    # refresh at 48, retransmissions at 49, 51, 55; expiry at 60 -> first registration again
    assert [t for t, _ in sent] == [48.0, 49.0, 51.0, 55.0]
    assert BindingExpired(V1) in events and bul.state is MnState.REGISTERING and bul.binding is None
    sent, _ = run_until(bul, 80.0)
    assert [t for t, _ in sent] == [63.0, 79.0]  # back-off continues (8 s, 16 s)


def test_binding_refresh_request_triggers_a_bu_when_bound_only():
    bul = bound(now=0.0)
    msgs, events = bul.handle_binding_refresh_request(10.0)
    assert len(msgs) == 1 and bul.state is MnState.REFRESHING
    assert StateChanged(MnState.BOUND, MnState.REFRESHING, MnInput.BRR_RECEIVED) in events
    msgs, events = bul.handle_binding_refresh_request(10.1)
    assert msgs == [] and events == [MessageIgnored("BRR", IgnoreReason.NOT_NEEDED)]
    assert make().handle_binding_refresh_request(0.0) == ([], [MessageIgnored("BRR", IgnoreReason.NO_BINDING)])


def test_binding_error_status_1_from_ha_reregisters_as_first_registration():
    bul = bound(now=0.0)
    msgs, events = bul.handle_binding_error(make_binding_error(BeStatus.UNKNOWN_BINDING_HAO, HOA), 5.0)
    assert len(msgs) == 1 and BindingLost(V1) in events and bul.state is MnState.REGISTERING
    assert bul.next_timer() == 6.5  # InitialBindackTimeoutFirstReg: the HA lost the binding
    _, events = bul.handle_binding_error(make_binding_error(1, "2001:db8:1::999"), 5.1)
    assert events == [MessageIgnored("BE", IgnoreReason.OTHER_HOME_ADDRESS)]
    _, events = bul.handle_binding_error(make_binding_error(BeStatus.UNKNOWN_MH_TYPE, HOA), 5.1)
    assert events == [MessageIgnored("BE", IgnoreReason.UNHANDLED_STATUS)]


# --- returning home (11.5.5) ----------------------------------------------------------------------


def test_returning_home_deregisters_then_reports_home():
    bul = bound(now=0.0)
    msgs, events = bul.movement(HOA, 20.0)
    assert events == [StateChanged(MnState.BOUND, MnState.DEREGISTERING, MnInput.MOVED_HOME)]
    (out,) = msgs
    assert out.bu.lifetime == 0 and out.bu.flags == BuFlag.A | BuFlag.H
    assert out.bu.options == (AlternateCareOfAddress(HOA),)
    assert (out.src, out.home_address_option) == (HOA, False)
    assert bul.next_timer() == 21.0  # a binding exists at the HA: INITIAL_BINDACK_TIMEOUT
    msgs, events = bul.handle_binding_ack(ack_for(bul, lifetime=0), 20.1)
    assert msgs == [] and ReturnedHome(HOA) in events
    assert bul.state is MnState.HOME and bul.next_timer() is None and bul.binding is None


def test_home_prefix_address_means_home_and_133_is_fine():
    bul = bound(now=0.0, home_prefix=IPv6Network("2001:db8:1::/64"))
    bul.movement(IPv6Address("2001:db8:1::abcd"), 1.0)
    assert bul.state is MnState.DEREGISTERING
    _, events = bul.handle_binding_ack(ack_for(bul, status=BaStatus.NOT_HOME_AGENT), 1.1)
    assert ReturnedHome(HOA) in events and bul.state is MnState.HOME


def test_deregistration_rejected_otherwise_fails():
    bul = bound(now=0.0)
    bul.movement(HOA, 1.0)
    _, events = bul.handle_binding_ack(ack_for(bul, status=BaStatus.REASON_UNSPECIFIED), 1.1)
    assert RegistrationFailed(128, None) in events and bul.state is MnState.FAILED


def test_moving_home_while_registering_deregisters_and_home_to_home_is_noop():
    bul = make()
    assert bul.movement(HOA, 0.0) == ([], [])
    bul.movement(V1, 1.0)
    msgs, _ = bul.movement(HOA, 1.2)
    assert bul.state is MnState.DEREGISTERING and msgs[0].bu.lifetime == 0
    assert bul.movement(HOA, 1.3) == ([], [])  # already de-registering


def test_leaving_home_again_before_the_deregistration_ack():
    bul = bound(now=0.0)
    bul.movement(HOA, 10.0)
    msgs, events = bul.movement(V2, 10.5)
    assert bul.state is MnState.REFRESHING and msgs[0].bu.lifetime == 15
    assert StateChanged(MnState.DEREGISTERING, MnState.REFRESHING, MnInput.MOVED_AWAY) in events


# --- rate limit (11.8: MAX_UPDATE_RATE per second) ----------------------------------------------


def test_fourth_bu_within_a_second_waits():
    bul = make()
    times = []
    for i, coa in enumerate([V1, V2, V1, V2]):
        msgs, _ = bul.movement(coa, 0.1 * i)
        times += [0.1 * i] * len(msgs)
    assert times == [0.0, 0.1, 0.2] and bul.outstanding is None
    assert bul.next_timer() == 1.0
    _, events = bul.handle_binding_ack(BindingAck(0, seq=102, lifetime=15), 0.5)
    assert events == [MessageIgnored("BA", IgnoreReason.NO_OUTSTANDING_BU)]  # superseded BU
    sent, _ = run_until(bul, 1.0)
    assert [(t, bu.options) for t, bu in sent] == [(1.0, (AlternateCareOfAddress(V2),))]
    assert bul.next_timer() == 2.5


# --- the transition table ------------------------------------------------------------------------


@pytest.mark.parametrize("state", list(MnState))
@pytest.mark.parametrize("event", list(MnInput))
def test_unlisted_pairs_raise(state, event):
    allowed = MN_TRANSITIONS.get((state, event), frozenset())
    for target in MnState:
        if target in allowed:
            assert mn_transition(state, event, target) is target
        else:
            with pytest.raises(MnTransitionError):
                mn_transition(state, event, target)


def test_an_unlisted_transition_leaves_the_state_unchanged():
    bul = bound(now=0.0)
    with pytest.raises(MnTransitionError):
        bul._go(MnInput.BA_ACCEPTED, MnState.HOME, ([], []))  # not in the table from BOUND
    assert bul.state is MnState.BOUND and bul.next_timer() == 48.0


def test_every_state_is_reachable_and_has_an_exit():
    sources = {s for s, _ in MN_TRANSITIONS}
    targets = {t for ts in MN_TRANSITIONS.values() for t in ts}
    assert sources == targets == set(MnState)


# --- DSMIPv6 (RFC 5555 4.4) -----------------------------------------------------------------------

HA4 = IPv4Address("198.51.100.1")
C4 = IPv4Address("192.0.2.50")
C4B = IPv4Address("192.0.2.60")


def test_ipv4_coa_bu_goes_in_udp_from_the_hoa():
    bul = make(ha_ipv4=HA4, force_udp=True)
    (out,), _ = bul.movement(C4, 0.0)
    assert out.bu.options == (Ipv4CareOfAddress(C4),) and out.bu.flags == BuFlag.A | BuFlag.H | BuFlag.F
    assert (out.src, out.udp_to, out.home_address_option) == (C4, HA4, False)
    with pytest.raises(Exception, match="ha_ipv4"):
        make().movement(C4, 0.0)


@pytest.mark.parametrize(
    "option,udp,nat,keepalive,refresh_at",
    [
        (NatDetection(False, 110), True, True, 110.0, 110.0),
        (NatDetection(False, 0), True, True, 110.0, 110.0),  # 0: ignore the field, NATKATIMEOUT
        (NatDetection(False, 30), True, True, 30.0, 30.0),
        (NatDetection(False, 0xFFFFFFFF), False, False, None, 480.0),
        (NatDetection(True, 0xFFFFFFFF), True, False, None, 480.0),  # F: UDP without a NAT
        (None, False, False, None, 480.0),
    ],
)
def test_nat_detection_option_decides_udp_and_keepalive(option, udp, nat, keepalive, refresh_at):
    bul = make(ha_ipv4=HA4, lifetime=600.0)
    bul.movement(C4, 0.0)
    bul.handle_binding_ack(ack_for(bul, options=(option,) if option else ()), 0.0)
    b = bul.binding
    assert (b.udp_encap, b.nat_detected, b.keepalive, b.refresh_at) == (udp, nat, keepalive, refresh_at)


def test_dual_stack_falls_back_to_ipv4_after_three_bus_and_keeps_the_family():
    bul = make(ha_ipv4=HA4)
    (first,), _ = bul.movement(V1, 0.0, ipv4_coa=C4)
    assert first.src == V1
    sent, events = run_until(bul, 10.5)
    assert [(t, bu.options[0]) for t, bu in sent] == [
        (1.5, AlternateCareOfAddress(V1)),
        (4.5, AlternateCareOfAddress(V1)),
        (10.5, Ipv4CareOfAddress(C4)),
    ]
    assert CareOfAddressFallback(V1, C4) in events and bul.coa == C4
    assert bul.next_timer() == 12.0  # a fresh back-off for the IPv4 CoA
    bul.handle_binding_ack(ack_for(bul), 10.6)
    (out,), _ = bul.movement(V2, 20.0, ipv4_coa=C4B)  # next network: IPv4 straight away
    assert out.src == C4B and out.udp_to == HA4
    bul.handle_binding_ack(ack_for(bul), 20.1)
    (out,), _ = bul.movement(V1, 30.0)  # IPv6-only network
    bul.handle_binding_ack(ack_for(bul), 30.1)
    (out,), _ = bul.movement(V2, 40.0, ipv4_coa=C4B)  # IPv6 worked: preferred again
    assert out.src == V2


def test_ipv4_home_address_request_assignment_and_refusal():
    from mobility.bul import Ipv4HomeAddressAssigned, Ipv4HomeAddressRefused
    from mobility.options import Ipv4AddressAck, Ipv4HomeAddress

    bul = make(ipv4_hoa=IPv4Address(0))
    (out,), _ = bul.movement(V1, 0.0)
    assert out.bu.options == (AlternateCareOfAddress(V1), Ipv4HomeAddress(IPv4Address(0)))
    given = IPv4Address("10.1.0.10")
    _, events = bul.handle_binding_ack(ack_for(bul, options=(Ipv4AddressAck(0, 32, given),)), 0.1)
    assert Ipv4HomeAddressAssigned(given, 32) in events and bul.binding.ipv4_hoa == given
    (out,), _ = bul.handle_binding_refresh_request(1.0)
    assert out.bu.options[1] == Ipv4HomeAddress(given)  # later BUs ask for the assigned address
    _, events = bul.handle_binding_ack(ack_for(bul, options=(Ipv4AddressAck(130, 0, given),)), 1.1)
    assert Ipv4HomeAddressRefused(130) in events and bul.binding.ipv4_hoa is None
    assert bul.state is MnState.BOUND  # the IPv6 binding stands (RFC 5555 4.4.2)
