"""MN BindingUpdateList driven by random inputs (Hypothesis stateful): every state change is one
MN_TRANSITIONS lists, and the RFC 6275 invariants hold after every step (sequence numbers only grow,
at most MAX_UPDATE_RATE BUs per second, back-off within [1, 32] s, timers match the state)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mobility.binding import seq_gt
from mobility.bul import (
    MN_TRANSITIONS,
    SENDING_STATES,
    BindingAckTimeout,
    BindingUpdateList,
    MnState,
    MobileNodeConfig,
    SequenceResynchronized,
    StateChanged,
)
from mobility.constants import MAX_BINDACK_TIMEOUT, BaStatus
from mobility.mh import BindingAck, make_binding_error
from mobility.options import NatDetection

HOA = IPv6Address("2001:db8:1::100")
PLACES = [HOA, IPv6Address("2001:db8:a::1"), IPv6Address("2001:db8:b::1"), IPv4Address("192.0.2.7")]
STATUSES = [0, 1, 128, 129, 133, 134, 135, 144]


class MobileNodeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        cfg = MobileNodeConfig(hoa=HOA, ha="2001:db8:1::1", lifetime=40.0, ha_ipv4="198.51.100.1", force_udp=True)
        self.bul = BindingUpdateList(cfg, rand=lambda n: b"\xff\xf0")
        self.now = 0.0
        self.sends: list[float] = []
        self.last_seq: int | None = None
        self.resync_to: int | None = None

    def _apply(self, state_before, result):
        msgs, events = result
        for event in events:
            if isinstance(event, StateChanged):
                assert event.old is state_before, "StateChanged chain is broken"
                assert event.new in MN_TRANSITIONS[(event.old, event.input)]
                state_before = event.new
            if isinstance(event, BindingAckTimeout):
                assert 1.0 <= event.timeout <= MAX_BINDACK_TIMEOUT
            if isinstance(event, SequenceResynchronized):
                self.resync_to = event.seq
        assert state_before is self.bul.state
        for out in msgs:
            seq = out.bu.seq
            if self.resync_to is not None:
                assert seq == (self.resync_to + 1) % 65536
                self.resync_to = None
            elif self.last_seq is not None:
                assert seq_gt(seq, self.last_seq)
            self.last_seq = seq
            self.sends.append(self.now)
            if out.bu.lifetime == 0:
                assert self.bul.state is MnState.DEREGISTERING and out.src == HOA and not out.home_address_option
            else:
                assert out.src == self.bul.coa and (out.udp_to is not None) == isinstance(out.src, IPv4Address)

    @rule(place=st.sampled_from(PLACES), dual=st.booleans())
    def move(self, place, dual):
        ipv4_coa = "192.0.2.99" if dual else None  # RFC 5555 4.4.1 dual-stack network
        self._apply(self.bul.state, self.bul.movement(place, self.now, ipv4_coa=ipv4_coa))

    @precondition(lambda self: self.bul.outstanding is not None)
    @rule(status=st.sampled_from(STATUSES), lifetime=st.sampled_from([0, 1, 10]), nat=st.booleans())
    def ack_outstanding(self, status, lifetime, nat):
        bu = self.bul.outstanding
        seq = (bu.seq + 7) % 65536 if status == BaStatus.SEQ_OUT_OF_WINDOW else bu.seq
        options = (NatDetection(False, 110 if nat else 0xFFFFFFFF),) if nat else ()
        ba = BindingAck(status, seq=seq, lifetime=lifetime, options=options)
        self._apply(self.bul.state, self.bul.handle_binding_ack(ba, self.now))

    @rule(seq=st.integers(0, 65535), status=st.sampled_from([0, 129]))
    def stray_ack(self, seq, status):
        bu = self.bul.outstanding
        if bu is not None and bu.seq == seq:
            return
        state = self.bul.state
        msgs, events = self.bul.handle_binding_ack(BindingAck(status, seq=seq, lifetime=5), self.now)
        assert msgs == [] and self.bul.state is state and len(events) == 1

    @rule()
    def refresh_request(self):
        self._apply(self.bul.state, self.bul.handle_binding_refresh_request(self.now))

    @rule(status=st.sampled_from([1, 2]))
    def binding_error(self, status):
        self._apply(self.bul.state, self.bul.handle_binding_error(make_binding_error(status, HOA), self.now))

    @rule(dt=st.sampled_from([0.05, 0.3, 1.0, 1.5, 5.0, 33.0, 100.0]))
    def advance(self, dt):
        end = self.now + dt
        while (t := self.bul.next_timer()) is not None and t <= end:
            self.now = max(self.now, t)  # a deadline may lie in the past (late BA): fires now
            self._apply(self.bul.state, self.bul.handle_timer(self.now))
        self.now = end

    @invariant()
    def timers_match_state(self):
        bul, nxt = self.bul, self.bul.next_timer()
        if bul.state in (MnState.HOME, MnState.FAILED):
            assert nxt is None and bul.outstanding is None
        elif bul.state is MnState.BOUND:
            assert bul.binding is not None and nxt == bul.binding.refresh_at and bul.outstanding is None
        else:
            assert bul.state in SENDING_STATES and nxt is not None
        if bul.state in (MnState.HOME, MnState.DEREGISTERING):
            assert bul.coa is None
        elif bul.state is not MnState.FAILED:
            assert bul.coa is not None
        if bul.state is MnState.BOUND:
            assert bul.binding.coa == bul.coa

    @invariant()
    def rate_limit(self):
        recent = self.sends[-4:]
        assert len(recent) < 4 or recent[0] + 1.0 <= recent[-1]


TestMobileNodeMachine = MobileNodeMachine.TestCase
TestMobileNodeMachine.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
