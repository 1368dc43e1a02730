"""HA BindingCache against a small reference model (Hypothesis stateful): every BU answer, every
entry state (BCE_TRANSITIONS) and every deadline follows RFC 6275 9.5.1 / 10.3.1 / 10.3.2."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv6Address

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from mobility.binding import (
    BCE_TRANSITIONS,
    BceInput,
    BceState,
    BindingCache,
    BindingCreated,
    BindingDeleted,
    BindingRefreshed,
    BindingUpdated,
    DeleteReason,
    HomeAgentConfig,
    seq_gt,
)
from mobility.constants import MAX_DELETE_BCE_TIMEOUT, BaStatus, BuFlag
from mobility.mh import BindingUpdate
from mobility.options import AlternateCareOfAddress

HOAS = [IPv6Address("2001:db8:1::1"), IPv6Address("2001:db8:1::2")]
COAS = [IPv6Address("2001:db8:a::1"), IPv6Address("2001:db8:b::1"), None, "hoa"]
MAX_UNITS = 30  # HA maximum: 120 s


@dataclass
class Model:
    state: BceState
    seq: int
    coa: IPv6Address
    deadline: float  # expiry (VALID) or purge (INVALID)


class BindingCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bc = BindingCache(HomeAgentConfig(home_prefixes=("2001:db8:1::/64",), max_lifetime=MAX_UNITS * 4))
        self.model: dict[IPv6Address, Model] = {}
        self.now = 0.0

    @rule(
        hoa=st.sampled_from(HOAS),
        seq_delta=st.sampled_from([1, 2, 0, -1, 32767, 32768, 40000]),
        lifetime=st.sampled_from([0, 1, 15, 60]),
        coa=st.sampled_from(COAS),
    )
    def binding_update(self, hoa, seq_delta, lifetime, coa):
        m = self.model.get(hoa)
        seq = ((m.seq if m else 65530) + seq_delta) % 65536
        coa = hoa if coa == "hoa" else coa
        options = (AlternateCareOfAddress(coa),) if coa is not None else ()
        ack, events = self.bc.handle_binding_update(
            BindingUpdate(seq, BuFlag.A | BuFlag.H, lifetime, options), hoa=hoa, src=hoa, now=self.now
        )
        self._check(hoa, m, seq, lifetime, coa, ack, events)

    def _check(self, hoa, m, seq, lifetime, coa, ack, events):
        state = m.state if m else BceState.ABSENT
        dereg = lifetime == 0 or coa == hoa
        if m is not None and not seq_gt(seq, m.seq):
            assert (ack.status, ack.seq) == (BaStatus.SEQ_OUT_OF_WINDOW, m.seq)
            return
        if dereg and m is None:
            assert ack.status == BaStatus.NOT_HOME_AGENT
            return
        if not dereg and coa is None:
            assert ack.status == BaStatus.INVALID_COA
            return
        assert ack.status == BaStatus.ACCEPTED and ack.seq == seq
        if dereg:
            new_state = BCE_TRANSITIONS[(state, BceInput.DEREGISTER)]
            expected = [BindingDeleted] if state is BceState.VALID else []
            assert [type(e) for e in events] == expected and ack.lifetime == 0
            self.model[hoa] = Model(new_state, seq, m.coa, self.now + MAX_DELETE_BCE_TIMEOUT)
            return
        granted = min(lifetime, MAX_UNITS)
        new_state = BCE_TRANSITIONS[(state, BceInput.REGISTER)]
        assert ack.lifetime == granted and new_state is BceState.VALID
        if state is not BceState.VALID:
            assert [type(e) for e in events] == [BindingCreated]
        elif m.coa != coa:
            assert [type(e) for e in events] == [BindingUpdated] and events[0].old_coa == m.coa
        else:
            assert [type(e) for e in events] == [BindingRefreshed]
        self.model[hoa] = Model(new_state, seq, coa, self.now + granted * 4)

    @rule(dt=st.sampled_from([0.5, 3.9, 4.0, 10.0, 60.0, 200.0]))
    def advance(self, dt):
        self.now += dt
        events = self.bc.handle_timer(self.now)
        expired = {e.hoa for e in events}
        assert all(isinstance(e, BindingDeleted) and e.reason is DeleteReason.EXPIRED for e in events)
        for hoa, m in list(self.model.items()):
            if m.deadline <= self.now:
                event = BceInput.EXPIRE if m.state is BceState.VALID else BceInput.PURGE
                assert BCE_TRANSITIONS[(m.state, event)] is BceState.ABSENT
                assert (hoa in expired) == (m.state is BceState.VALID)
                del self.model[hoa]
            else:
                assert hoa not in expired

    @invariant()
    def cache_matches_model(self):
        for hoa in HOAS:
            m, entry = self.model.get(hoa), self.bc.entry(hoa)
            if m is None:
                assert entry is None
                continue
            assert (entry.state, entry.seq) == (m.state, m.seq)
            assert (self.bc.lookup(hoa) is not None) == (m.state is BceState.VALID)
            if m.state is BceState.VALID:
                assert (entry.coa, entry.expires) == (m.coa, m.deadline)
        deadlines = [m.deadline for m in self.model.values()]
        assert self.bc.next_timer() == (min(deadlines) if deadlines else None)


TestBindingCacheMachine = BindingCacheMachine.TestCase
TestBindingCacheMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
