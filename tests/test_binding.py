"""HA BindingCache (RFC 6275 9.5.1, 10.3.1, 10.3.2): statuses, sequence window, lifetimes, expiry."""

from __future__ import annotations

from ipaddress import IPv6Address

import pytest
from hypothesis import given, strategies as st

from mobility.binding import (
    BCE_TRANSITIONS,
    BceInput,
    BceState,
    BceTransitionError,
    BindingCache,
    BindingCreated,
    BindingDeleted,
    BindingRefreshed,
    BindingUpdateDiscarded,
    BindingUpdated,
    BindingUpdateRejected,
    DeleteReason,
    DiscardReason,
    HomeAgentConfig,
    HomePrefix,
    SendBindingRefreshRequest,
    bce_transition,
    seq_gt,
    seq_next,
)
from mobility.constants import MAX_DELETE_BCE_TIMEOUT, BaFlag, BaStatus, BuFlag
from mobility.mh import BindingRefreshRequest, BindingUpdate
from mobility.options import AlternateCareOfAddress, BindingRefreshAdvice, NonceIndices

HOME = "2001:db8:1::/64"
HOA = IPv6Address("2001:db8:1::100")
HOA2 = IPv6Address("2001:db8:1::200")
COA1 = IPv6Address("2001:db8:a::100")
COA2 = IPv6Address("2001:db8:b::100")
AH = BuFlag.A | BuFlag.H


def cache(**kw) -> BindingCache:
    kw.setdefault("home_prefixes", (HOME,))
    return BindingCache(HomeAgentConfig(**kw))


def bu(seq: int, lifetime: int = 60, coa: IPv6Address | None = COA1, flags: BuFlag = AH, extra=()) -> BindingUpdate:
    options = (AlternateCareOfAddress(coa),) if coa is not None else ()
    return BindingUpdate(seq, flags, lifetime, options + tuple(extra))


def send(bc: BindingCache, msg: BindingUpdate, now: float = 0.0, hoa: IPv6Address = HOA, src=None):
    return bc.handle_binding_update(msg, hoa=hoa, src=src or hoa, now=now)


# --- sequence arithmetic (RFC 6275 9.5.1) --------------------------------------------------------


def test_seq_gt_rfc_example_last_15():
    """RFC 6275 9.5.1: last = 15 -> 0..15 and 32783..65535 are "less than or equal"."""
    not_newer = {s for s in range(65536) if not seq_gt(s, 15)}
    assert not_newer == set(range(0, 16)) | set(range(32783, 65536))


@pytest.mark.parametrize(
    "a,b,expected",
    [(0, 65535, True), (65535, 0, False), (1, 0, True), (32767, 0, True), (32768, 0, False), (5, 5, False)],
)
def test_seq_gt_wrap(a, b, expected):
    assert seq_gt(a, b) is expected


def test_seq_next_wraps():
    assert seq_next(65535) == 0 and seq_next(0) == 1


@given(st.integers(0, 65535), st.integers(0, 65535))
def test_seq_gt_is_a_tournament_except_the_antipode(a, b):
    """Exactly one of a > b, b > a holds unless a == b or they are 32768 apart (both false)."""
    if a == b or (a - b) % 65536 == 32768:
        assert not seq_gt(a, b) and not seq_gt(b, a)
    else:
        assert seq_gt(a, b) != seq_gt(b, a)
    assert seq_gt(seq_next(a), a)


# --- registration (10.3.1) -----------------------------------------------------------------------


def test_first_registration_creates_entry_and_acks():
    bc = cache()
    ack, events = send(bc, bu(7, lifetime=60), now=100.0)
    assert (ack.status, ack.seq, ack.lifetime, ack.flags) == (BaStatus.ACCEPTED, 7, 60, BaFlag(0))
    assert events == [BindingCreated(HOA, COA1, bc.lookup(HOA))]
    entry = bc.lookup(HOA)
    assert (entry.coa, entry.seq, entry.lifetime, entry.expires, entry.flags) == (COA1, 7, 60, 340.0, AH)
    assert HOA in bc and len(bc) == 1


def test_ack_sent_even_without_a_flag():
    ack, _ = send(cache(), bu(1, flags=BuFlag.H))
    assert ack is not None and ack.status == BaStatus.ACCEPTED  # 10.3.1 "Regardless of the A bit"


def test_any_sequence_number_accepted_without_entry():
    for seq in (0, 1, 32768, 65535):
        ack, _ = send(cache(), bu(seq))
        assert ack.status == BaStatus.ACCEPTED and ack.seq == seq


def test_new_coa_is_binding_updated_same_coa_is_refresh():
    bc = cache()
    send(bc, bu(1, coa=COA1))
    _, events = send(bc, bu(2, coa=COA2), now=1.0)
    assert len(events) == 1 and isinstance(events[0], BindingUpdated)
    assert (events[0].old_coa, events[0].new_coa) == (COA1, COA2)
    _, events = send(bc, bu(3, coa=COA2), now=2.0)
    assert [type(e) for e in events] == [BindingRefreshed]
    assert bc.lookup(HOA).seq == 3 and bc.lookup(HOA).expires == 2.0 + 240


def test_lifetime_is_capped_by_ha_maximum_in_4_second_units():
    bc = cache(max_lifetime=1000.0)  # 250 units
    ack, _ = send(bc, bu(1, lifetime=0xFFFF), now=10.0)
    assert ack.lifetime == 250 and bc.lookup(HOA).expires == 10.0 + 1000
    bc = cache(max_lifetime=1003.0)  # rounded down to whole 4 s units: never more than allowed
    ack, _ = send(bc, bu(1, lifetime=0xFFFF))
    assert ack.lifetime == 250


def test_lifetime_never_above_the_bu():
    ack, _ = send(cache(max_lifetime=3600.0), bu(1, lifetime=3))
    assert ack.lifetime == 3


def test_lifetime_capped_by_prefix_valid_lifetime_gives_status_1():
    """10.3.1: <= remaining valid lifetime of the prefix; status 1 when it becomes invalid at the
    end of the binding (compared in 4 s units)."""
    bc = cache(home_prefixes=(HomePrefix(HOME, valid_until=500.0),))
    ack, _ = send(bc, bu(1, lifetime=1000), now=100.0)
    assert (ack.status, ack.lifetime) == (BaStatus.ACCEPTED_PREFIX_DISCOVERY, 100)
    assert bc.lookup(HOA).expires == 500.0


def test_deprecated_prefix_gives_status_1_without_shortening():
    bc = cache(home_prefixes=(HomePrefix(HOME, preferred_until=50.0),))
    ack, _ = send(bc, bu(1, lifetime=60), now=0.0)
    assert (ack.status, ack.lifetime) == (BaStatus.ACCEPTED_PREFIX_DISCOVERY, 60)
    bc = cache(home_prefixes=(HomePrefix(HOME, preferred_until=10_000.0, valid_until=20_000.0),))
    ack, _ = send(bc, bu(1, lifetime=60))
    assert ack.status == BaStatus.ACCEPTED


def test_expired_prefix_is_not_home_subnet():
    bc = cache(home_prefixes=(HomePrefix(HOME, valid_until=3.0),))
    ack, _ = send(bc, bu(1), now=0.0)
    assert ack.status == BaStatus.NOT_HOME_SUBNET and bc.lookup(HOA) is None


def test_binding_refresh_advice_below_lifetime():
    ack, _ = send(cache(refresh_advice_ratio=0.5), bu(1, lifetime=60))
    assert ack.options == (BindingRefreshAdvice(30),)
    ack, _ = send(cache(refresh_advice_ratio=0.5), bu(1, lifetime=1))
    assert ack.options == ()  # 0 units would not be < Lifetime in a useful way: omitted


def test_k_flag_needs_both_sides():
    assert send(cache(), bu(1, flags=AH | BuFlag.K))[0].flags == BaFlag(0)
    assert send(cache(key_mgmt_mobility=True), bu(1, flags=AH | BuFlag.K))[0].flags == BaFlag.K
    assert send(cache(key_mgmt_mobility=True), bu(1))[0].flags == BaFlag(0)


# --- rejections -----------------------------------------------------------------------------------


def _rejected(result, status):
    ack, events = result
    assert ack.status == status and ack.lifetime == 0
    assert events == [BindingUpdateRejected(events[0].hoa, int(status), events[0].detail)]
    return ack


def test_status_135_carries_last_accepted_seq():
    bc = cache()
    send(bc, bu(10))
    for stale in (10, 9, 0, 10 + 32768, 65535):
        ack = _rejected(send(bc, bu(stale, coa=COA2), now=1.0), BaStatus.SEQ_OUT_OF_WINDOW)
        assert ack.seq == 10
    assert bc.lookup(HOA).coa == COA1  # nothing changed
    assert send(bc, bu(11, coa=COA2))[0].status == BaStatus.ACCEPTED


def test_sequence_wrap_65535_to_0():
    bc = cache()
    assert send(bc, bu(65535))[0].status == BaStatus.ACCEPTED
    assert send(bc, bu(0, coa=COA2), now=1.0)[0].status == BaStatus.ACCEPTED
    assert bc.lookup(HOA).coa == COA2
    ack = _rejected(send(bc, bu(65535), now=2.0), BaStatus.SEQ_OUT_OF_WINDOW)
    assert ack.seq == 0


def test_missing_alternate_coa_is_invalid_coa_174():
    bc = cache()
    ack = _rejected(send(bc, bu(1, coa=None), src=COA1), BaStatus.INVALID_COA)
    assert ack.seq == 1 and bc.lookup(HOA) is None


def test_not_home_subnet_132():
    _rejected(send(cache(), bu(1), hoa=IPv6Address("2001:db8:99::1")), BaStatus.NOT_HOME_SUBNET)


def test_not_served_hoa_is_administratively_prohibited_129():
    bc = cache(mobile_nodes=frozenset({HOA}))
    assert send(bc, bu(1))[0].status == BaStatus.ACCEPTED
    _rejected(send(bc, bu(1), hoa=HOA2), BaStatus.ADMIN_PROHIBITED)


def test_not_acting_as_home_agent_131():
    _rejected(send(cache(enabled=False), bu(1)), BaStatus.HOME_REGISTRATION_NOT_SUPPORTED)


def test_cache_full_130_only_for_new_mobile_nodes():
    bc = cache(max_bindings=1)
    send(bc, bu(1))
    _rejected(send(bc, bu(1), hoa=HOA2), BaStatus.INSUFFICIENT_RESOURCES)
    assert send(bc, bu(2, coa=COA2))[0].status == BaStatus.ACCEPTED  # existing MN may move


def test_h_flag_change_is_139_and_keeps_entry():
    bc = cache()
    send(bc, bu(1))
    _rejected(send(bc, bu(2, flags=BuFlag.A)), BaStatus.REG_TYPE_CHANGE_DISALLOWED)
    assert bc.lookup(HOA).flags == AH and bc.lookup(HOA).seq == 1


@pytest.mark.parametrize(
    "msg,hoa,reason",
    [
        (bu(1, flags=BuFlag.A), HOA, DiscardReason.NOT_HOME_REGISTRATION),
        (bu(1, extra=(NonceIndices(1, 2),)), HOA, DiscardReason.NONCE_INDICES_IN_HOME_REG),
        (bu(1, coa=IPv6Address("ff02::1")), HOA, DiscardReason.COA_NOT_UNICAST),
        (bu(1, coa=IPv6Address("fe80::1")), HOA, DiscardReason.COA_NOT_UNICAST),
        (bu(1), IPv6Address("fe80::100"), DiscardReason.HOA_NOT_UNICAST),
        (bu(1), IPv6Address("::"), DiscardReason.HOA_NOT_UNICAST),
    ],
)
def test_silent_discards(msg, hoa, reason):
    bc = cache()
    assert send(bc, msg, hoa=hoa) == (None, [BindingUpdateDiscarded(hoa, reason)])
    assert bc.entries() == () and bc.next_timer() is None


# --- de-registration (10.3.2) --------------------------------------------------------------------


def test_deregistration_lifetime_0_stops_forwarding_and_keeps_seq_10s():
    bc = cache()
    send(bc, bu(1))
    ack, events = send(bc, bu(2, lifetime=0, coa=None), now=5.0)
    assert (ack.status, ack.seq, ack.lifetime, ack.options) == (BaStatus.ACCEPTED, 2, 0, ())
    assert [type(e) for e in events] == [BindingDeleted] and events[0].reason is DeleteReason.DEREGISTERED
    assert events[0].coa == COA1
    assert bc.lookup(HOA) is None and HOA not in bc and bc.entry(HOA).state is BceState.INVALID
    # a delayed older registration from the visited link is refused with 135
    ack, events = send(bc, bu(1, coa=COA1), now=6.0)
    assert (ack.status, ack.seq) == (BaStatus.SEQ_OUT_OF_WINDOW, 2) and bc.lookup(HOA) is None
    assert bc.next_timer() == 5.0 + MAX_DELETE_BCE_TIMEOUT
    assert bc.handle_timer(14.9) == [] and bc.entry(HOA) is not None
    assert bc.handle_timer(15.0) == [] and bc.entry(HOA) is None and bc.next_timer() is None
    assert send(bc, bu(1), now=16.0)[0].status == BaStatus.ACCEPTED  # no entry: any seq


def test_deregistration_by_coa_equal_hoa():
    bc = cache()
    send(bc, bu(1))
    ack, events = send(bc, bu(2, lifetime=60, coa=HOA))
    assert (ack.status, ack.lifetime) == (BaStatus.ACCEPTED, 0)
    assert isinstance(events[0], BindingDeleted) and bc.lookup(HOA) is None


def test_deregistration_without_binding_is_133():
    _rejected(send(cache(), bu(1, lifetime=0, coa=None)), BaStatus.NOT_HOME_AGENT)


def test_retransmitted_deregistration_is_acked_again_without_event():
    bc = cache()
    send(bc, bu(1))
    send(bc, bu(2, lifetime=0, coa=HOA), now=1.0)
    ack, events = send(bc, bu(3, lifetime=0, coa=HOA), now=2.0)
    assert (ack.status, ack.seq, events) == (BaStatus.ACCEPTED, 3, [])


def test_reregistration_after_deregistration_is_created():
    bc = cache()
    send(bc, bu(1))
    send(bc, bu(2, lifetime=0, coa=HOA), now=1.0)
    ack, events = send(bc, bu(3, coa=COA2), now=2.0)
    assert ack.status == BaStatus.ACCEPTED and events == [BindingCreated(HOA, COA2, bc.lookup(HOA))]


# --- expiry and timers ---------------------------------------------------------------------------


def test_expiry_deletes_entry_at_absolute_deadline():
    bc = cache()
    send(bc, bu(1, lifetime=15), now=3.0)  # 60 s
    assert bc.next_timer() == 63.0
    assert bc.handle_timer(62.999) == [] and bc.lookup(HOA) is not None
    events = bc.handle_timer(63.0)
    assert [(type(e), e.reason) for e in events] == [(BindingDeleted, DeleteReason.EXPIRED)]
    assert bc.lookup(HOA) is None and bc.entry(HOA) is None and bc.next_timer() is None


def test_refresh_moves_the_deadline():
    bc = cache()
    send(bc, bu(1, lifetime=15), now=0.0)
    send(bc, bu(2, lifetime=15), now=50.0)
    assert bc.next_timer() == 110.0 and bc.handle_timer(60.0) == []


def test_binding_refresh_request_before_expiry():
    bc = cache(brr_lead=20.0)
    send(bc, bu(1, lifetime=15), now=0.0)
    assert bc.next_timer() == 40.0
    assert bc.handle_timer(40.0) == [SendBindingRefreshRequest(HOA, COA1, BindingRefreshRequest())]
    assert bc.next_timer() == 60.0


def test_many_entries_expire_in_deadline_order():
    bc = cache()
    hoas = [IPv6Address(f"2001:db8:1::{i:x}") for i in range(1, 40)]
    for i, hoa in enumerate(hoas):
        send(bc, bu(1, lifetime=1 + (i * 7) % 13), hoa=hoa)
    deleted = [e.hoa for e in bc.handle_timer(1e9)]
    lifetime = {hoa: 1 + (i * 7) % 13 for i, hoa in enumerate(hoas)}
    assert deleted == sorted(hoas, key=lambda h: (lifetime[h], hoas.index(h)))  # ties: arming order


# --- transition table ----------------------------------------------------------------------------


@pytest.mark.parametrize("state", list(BceState))
@pytest.mark.parametrize("event", list(BceInput))
def test_bce_table_pairs_listed_or_raise(state, event):
    if (state, event) in BCE_TRANSITIONS:
        assert bce_transition(state, event) is BCE_TRANSITIONS[(state, event)]
    else:
        with pytest.raises(BceTransitionError):
            bce_transition(state, event)
