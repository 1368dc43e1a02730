"""MN BindingUpdateList and HA BindingCache wired together in memory (aioquic client_and_server
style): BUs and BAs travel as Mobility Header bytes (push_mh -> pull_mh, checksum verified) over a
fake network with a fake clock, one-way delay and programmable loss.

    MN (BindingUpdateList)  --BU bytes, delay, loss-->  HA (BindingCache)
                            <--BA / BRR bytes---------
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

import pytest

from mobility import bul as mn
from mobility.binding import (
    BindingCache,
    BindingCreated,
    BindingDeleted,
    BindingRefreshed,
    BindingUpdated,
    DeleteReason,
    HomeAgentConfig,
    Ipv4Endpoint,
    SendBindingRefreshRequest,
)
from mobility.bul import BindingUpdateList, MnState, MobileNodeConfig, OutgoingBindingUpdate
from mobility.constants import BaStatus, BeStatus
from mobility.mh import (
    BindingAck,
    BindingRefreshRequest,
    BindingUpdate,
    make_binding_error,
    pull_mh,
    push_mh,
    verify_checksum,
)

HOA = IPv6Address("2001:db8:1::100")
HA = IPv6Address("2001:db8:1::1")
HA4 = IPv4Address("198.51.100.1")
V1 = IPv6Address("2001:db8:a::100")
V2 = IPv6Address("2001:db8:b::100")
V4 = IPv4Address("192.168.7.20")  # private, behind a NAT
NAT_PUBLIC = IPv4Address("203.0.113.5")


class Net:
    """A discrete-event network between one MN and one HA. ``lose(kind, n)`` decides whether the
    n-th message of ``kind`` ("BU", "BA", "BRR"; counting from 0) is lost."""

    def __init__(
        self,
        mobile: BindingUpdateList,
        agent: BindingCache,
        *,
        delay: float = 0.02,
        lose: Callable[[str, int], bool] = lambda kind, n: False,
    ) -> None:
        self.mn, self.ha = mobile, agent
        self.delay, self.lose = delay, lose
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self.counts = {"BU": 0, "BA": 0, "BRR": 0}
        self.bu_log: list[tuple[float, BindingUpdate]] = []  # every BU the MN sent
        self.ba_log: list[tuple[float, BindingAck]] = []  # every BA the MN received
        self.mn_events: list = []
        self.ha_events: list = []
        self.routes: dict[IPv6Address, object] = {}  # what an HA adapter would program
        self.nat_port = 40001
        self.delayed_bu: list[OutgoingBindingUpdate] = []  # held back by hold_next_bu

    # -- wiring ----------------------------------------------------------------------------------

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (self.now + delay, next(self._order), fn))

    def _lost(self, kind: str) -> bool:
        n = self.counts[kind]
        self.counts[kind] += 1
        return self.lose(kind, n)

    def mn_result(self, result) -> None:
        msgs, events = result
        self.mn_events += [(self.now, e) for e in events]
        for out in msgs:
            self.bu_log.append((self.now, out.bu))
            wire = out.push()
            if not self._lost("BU"):
                self._later(self.delay, lambda wire=wire, out=out: self._ha_receives(wire, out))

    def _ha_receives(self, wire: bytes, out: OutgoingBindingUpdate) -> None:
        assert verify_checksum(wire, out.hoa, out.ha)  # pseudo-header: HoA -> HA (RFC 6275 6.1.1)
        bu = pull_mh(wire)
        udp = None
        if out.udp_to is not None:  # DSMIPv6: the NAT rewrites the outer source
            assert out.udp_to == HA4
            udp = Ipv4Endpoint(NAT_PUBLIC, self.nat_port) if out.src == V4 else Ipv4Endpoint(out.src, 4191)
        ack, events = self.ha.handle_binding_update(bu, hoa=out.hoa, src=out.hoa, now=self.now, udp_source=udp)
        self._ha_apply(events)
        if ack is not None:
            self._ha_sends(push_mh(ack, HA, out.hoa), "BA")

    def _ha_apply(self, events) -> None:
        self.ha_events += [(self.now, e) for e in events]
        for e in events:
            if isinstance(e, (BindingCreated, BindingUpdated)):
                self.routes[e.hoa] = e.entry.tunnel_destination
            elif isinstance(e, BindingDeleted):
                self.routes.pop(e.hoa, None)
            elif isinstance(e, SendBindingRefreshRequest):
                self._ha_sends(push_mh(e.message, HA, e.hoa), "BRR")

    def _ha_sends(self, wire: bytes, kind: str) -> None:
        if not self._lost(kind):
            self._later(self.delay, lambda: self._mn_receives(wire))

    def _mn_receives(self, wire: bytes) -> None:
        assert verify_checksum(wire, HA, HOA)  # pseudo-header: HA -> HoA (RH2 final destination)
        msg = pull_mh(wire)
        if isinstance(msg, BindingAck):
            self.ba_log.append((self.now, msg))
            self.mn_result(self.mn.handle_binding_ack(msg, self.now))
        else:
            assert isinstance(msg, BindingRefreshRequest)
            self.mn_result(self.mn.handle_binding_refresh_request(self.now))

    # -- the clock -------------------------------------------------------------------------------

    def _next(self) -> float | None:
        times = [t for t in (self.mn.next_timer(), self.ha.next_timer()) if t is not None]
        if self._queue:
            times.append(self._queue[0][0])
        return min(times) if times else None

    def run_until(self, end: float) -> None:
        while (t := self._next()) is not None and t <= end:
            self.now = max(self.now, t)
            if self._queue and self._queue[0][0] <= self.now:
                heapq.heappop(self._queue)[2]()
            elif (t_mn := self.mn.next_timer()) is not None and t_mn <= self.now:
                self.mn_result(self.mn.handle_timer(self.now))
            else:
                self._ha_apply(self.ha.handle_timer(self.now))
        self.now = max(self.now, end)

    def run_until_state(self, state: MnState, limit: float = 500.0) -> float:
        start = self.now
        while self.mn.state is not state:
            t = self._next()
            assert t is not None and t <= start + limit, f"MN stuck in {self.mn.state} at {self.now}"
            self.run_until(t)
        return self.now - start

    def move(self, coa) -> None:
        self.mn_result(self.mn.movement(coa, self.now))

    def events_of(self, cls, since: float = -1.0) -> list:
        return [e for t, e in self.mn_events + self.ha_events if isinstance(e, cls) and t >= since]


def setup(seq0: int = 1000, lifetime: float = 60.0, ha_kw=None, mn_kw=None, **net_kw) -> Net:
    pool = (IPv4Address("10.1.0.10"),)
    ha_cfg = HomeAgentConfig(home_prefixes=("2001:db8:1::/64",), ipv4_pool=pool, **(ha_kw or {}))
    mn_cfg = MobileNodeConfig(hoa=HOA, ha=HA, lifetime=lifetime, ha_ipv4=HA4, **(mn_kw or {}))
    mobile = BindingUpdateList(mn_cfg, rand=lambda n: seq0.to_bytes(n, "big"))
    return Net(mobile, BindingCache(ha_cfg), **net_kw)


# --- the handover walk ---------------------------------------------------------------------------


def test_walk_home_v1_v2_v1_home_with_ha_cache_following():
    net = setup(delay=0.02)
    net.move(HOA)  # boot at home: nothing to do
    assert net.bu_log == [] and net.mn.state is MnState.HOME
    for coa in (V1, V2, V1):
        t0 = net.now
        net.move(coa)
        elapsed = net.run_until_state(MnState.BOUND)
        assert elapsed == pytest.approx(0.04)  # one BU -> BA round trip, no retransmission
        assert net.ha.lookup(HOA).coa == coa and net.routes[HOA] == coa and net.mn.binding.coa == coa
        net.run_until(net.now + 30.0)  # dwell 30 s on this link
        assert net.ha.lookup(HOA).coa == coa and net.now - t0 > 30
    registered = net.events_of(mn.Registered)
    assert [(r.coa, r.previous_coa) for r in registered] == [(V1, None), (V2, V1), (V1, V2)]
    assert [type(e) for e in net.events_of(BindingCreated) + net.events_of(BindingUpdated)] == [
        BindingCreated,
        BindingUpdated,
        BindingUpdated,
    ]
    net.move(HOA)
    assert net.run_until_state(MnState.HOME) == pytest.approx(0.04)
    assert net.events_of(mn.ReturnedHome) == [mn.ReturnedHome(HOA)]
    assert net.ha.lookup(HOA) is None and HOA not in net.routes
    (deleted,) = net.events_of(BindingDeleted)
    assert deleted.reason is DeleteReason.DEREGISTERED and deleted.coa == V1
    net.run_until(net.now + 11.0)  # MAX_DELETE_BCE_TIMEOUT: the invalid entry is purged
    assert net.ha.entry(HOA) is None and net.mn.next_timer() is None and net.ha.next_timer() is None
    seqs = [bu.seq for _, bu in net.bu_log]
    assert seqs == list(range(1000, 1000 + len(seqs)))  # every BU a new, larger number
    assert net.bu_log[-1][1].lifetime == 0


def test_long_stay_is_refreshed_and_never_expires_at_the_ha():
    net = setup(lifetime=60.0)
    net.move(V1)
    net.run_until(1000.0)
    assert net.ha.lookup(HOA).coa == V1 and net.events_of(BindingDeleted) == []
    refreshes = net.events_of(mn.BindingRefreshed)
    assert len(refreshes) == 20  # every 48 s (80% of 60 s) after the first registration
    sent_at = [t for t, _ in net.bu_log]
    assert sent_at[1] == pytest.approx(0.0 + 48.0)  # counted from the acknowledged BU's send time


# --- loss and retransmission ---------------------------------------------------------------------


def test_lost_bus_are_retransmitted_with_first_registration_backoff():
    net = setup(lose=lambda kind, n: kind == "BU" and n < 3)
    net.move(V1)
    elapsed = net.run_until_state(MnState.BOUND)
    assert [t for t, _ in net.bu_log] == [0.0, 1.5, 4.5, 10.5]
    assert elapsed == pytest.approx(10.54)
    assert [e.timeout for e in net.events_of(mn.BindingAckTimeout)] == [3.0, 6.0, 12.0]
    assert net.ha.lookup(HOA).seq == net.bu_log[-1][1].seq


def test_lost_bas_the_ha_keeps_accepting_the_larger_numbers():
    net = setup(lose=lambda kind, n: kind == "BA" and n < 2)
    net.move(V1)
    net.run_until_state(MnState.BOUND)
    assert [t for t, _ in net.bu_log] == [0.0, 1.5, 4.5]
    assert [type(e) for _, e in net.ha_events] == [BindingCreated, BindingRefreshed, BindingRefreshed]
    assert net.ha.lookup(HOA).seq == net.bu_log[-1][1].seq and net.mn.binding.sent_at == 4.5


def test_handover_with_loss_uses_reregistration_backoff():
    net = setup(lose=lambda kind, n: kind == "BU" and n in (1, 2))
    net.move(V1)
    net.run_until_state(MnState.BOUND)
    net.run_until(10.0)
    net.move(V2)
    net.run_until_state(MnState.BOUND)
    assert [t for t, _ in net.bu_log] == [0.0, 10.0, 11.0, 13.0]  # 1 s, then doubling
    assert net.ha.lookup(HOA).coa == V2


def test_silent_mn_expires_at_the_ha_and_reregisters_when_the_link_returns():
    down = {"on": False}
    net = setup(lifetime=40.0, lose=lambda kind, n: down["on"])
    net.move(V1)
    net.run_until_state(MnState.BOUND)
    down["on"] = True
    net.run_until(50.0)
    (deleted,) = net.events_of(BindingDeleted)
    assert deleted.reason is DeleteReason.EXPIRED and net.ha.lookup(HOA) is None
    assert net.events_of(mn.BindingExpired) == [mn.BindingExpired(V1)]
    assert net.mn.state is MnState.REGISTERING
    down["on"] = False
    net.run_until_state(MnState.BOUND)
    assert net.ha.lookup(HOA).coa == V1 and len(net.events_of(BindingCreated)) == 2


# --- sequence numbers ----------------------------------------------------------------------------


def test_sequence_wrap_through_the_walk():
    net = setup(seq0=65533)
    for coa in (V1, V2, V1, HOA):
        net.move(coa)
        net.run_until_state(MnState.HOME if coa == HOA else MnState.BOUND)
    assert [bu.seq for _, bu in net.bu_log] == [65533, 65534, 65535, 0]
    assert [ba.status for _, ba in net.ba_log] == [0, 0, 0, 0]


def test_rebooted_mn_resynchronises_from_135():
    net = setup(seq0=50000)
    net.move(V1)
    net.run_until_state(MnState.BOUND)
    # the MN reboots with a fresh list and a random start below the HA's last accepted number
    cfg = MobileNodeConfig(hoa=HOA, ha=HA, lifetime=60.0)
    net.mn = BindingUpdateList(cfg, rand=lambda n: (49000).to_bytes(n, "big"))
    net.move(V2)
    net.run_until_state(MnState.BOUND)
    assert [ba.status for _, ba in net.ba_log] == [0, BaStatus.SEQ_OUT_OF_WINDOW, 0]
    assert [bu.seq for _, bu in net.bu_log] == [50000, 49000, 50001]
    assert net.ha.lookup(HOA).coa == V2


def test_delayed_bu_after_deregistration_gets_135_and_changes_nothing():
    """RFC 6275 10.3.2 race: a refresh from the visited link arrives after the de-registration."""
    net = setup()
    net.move(V1)
    net.run_until_state(MnState.BOUND)
    late = net.mn.handle_binding_refresh_request(net.now)[0][0]  # a refresh BU, held back
    net.move(HOA)
    net.run_until_state(MnState.HOME)
    ack, events = net.ha.handle_binding_update(pull_mh(late.push()), hoa=HOA, src=HOA, now=net.now)
    assert ack.status == BaStatus.SEQ_OUT_OF_WINDOW and net.ha.lookup(HOA) is None
    ignored = mn.MessageIgnored("BA", mn.IgnoreReason.NO_OUTSTANDING_BU)
    assert net.mn.handle_binding_ack(ack, net.now)[1] == [ignored]


# --- refresh requests and a restarted HA ---------------------------------------------------------


def test_binding_refresh_request_from_ha_gets_a_refresh():
    net = setup(lifetime=400.0, ha_kw={"brr_lead": 200.0}, mn_kw={"refresh_ratio": 0.95})
    net.move(V1)
    net.run_until(250.0)
    assert net.counts["BRR"] == 1 and len(net.bu_log) == 2
    assert net.bu_log[1][0] == pytest.approx(200.04)  # BRR at 200 s + delay
    assert net.ha.lookup(HOA).expires == pytest.approx(200.06 + 400)


def test_restarted_ha_binding_error_makes_the_mn_register_again():
    net = setup()
    net.move(V1)
    net.run_until_state(MnState.BOUND)
    net.ha = BindingCache(net.ha.config)  # state lost
    # the HA's adapter answers the MN's next packet with a Home Address option by BE status 1
    net.mn_result(net.mn.handle_binding_error(make_binding_error(BeStatus.UNKNOWN_BINDING_HAO, HOA), net.now))
    assert net.mn.state is MnState.REGISTERING
    net.run_until_state(MnState.BOUND)
    assert net.ha.lookup(HOA).coa == V1


# --- DSMIPv6 -------------------------------------------------------------------------------------


def test_ipv4_coa_behind_nat_then_back_to_ipv6():
    net = setup(lifetime=600.0, mn_kw={"ipv4_hoa": IPv4Address(0)})
    net.move(V1)
    net.run_until_state(MnState.BOUND)
    assert net.mn.binding.ipv4_hoa == IPv4Address("10.1.0.10")
    net.move(V4)
    net.run_until_state(MnState.BOUND)
    entry = net.ha.lookup(HOA)
    assert (entry.coa, entry.nat_detected, entry.udp_encap) == (V4, True, True)
    assert net.routes[HOA] == NAT_PUBLIC and net.ha.lookup_ipv4("10.1.0.10").hoa == HOA
    b = net.mn.binding
    assert (b.udp_encap, b.nat_detected, b.keepalive) == (True, True, 110.0)
    assert net.events_of(mn.Registered)[-1] == mn.Registered(V4, 600, V1, True, True, IPv4Address("10.1.0.10"))
    # NAT keepalive: the BU/BA pair every NATKATIMEOUT while behind the NAT (RFC 5555 4.3)
    t_bound = b.sent_at
    net.run_until(t_bound + 111.0)
    assert [t for t, _ in net.bu_log][-1] == pytest.approx(t_bound + 110.0)
    # the NAT's mapping changes: the HA follows it after the next authenticated BU
    net.nat_port = 50999
    net.run_until(t_bound + 221.0)
    assert net.ha.lookup(HOA).udp_source == Ipv4Endpoint(NAT_PUBLIC, 50999)
    net.move(V2)
    net.run_until_state(MnState.BOUND)
    entry = net.ha.lookup(HOA)
    assert (entry.coa, entry.udp_encap, net.routes[HOA], net.mn.binding.udp_encap) == (V2, False, V2, False)


def test_forced_udp_refused_then_retried_without_f():
    net = setup(ha_kw={"accept_force_udp": False}, mn_kw={"force_udp": True})
    net.move(IPv4Address("192.0.2.33"))  # public IPv4 CoA, no NAT
    net.run_until_state(MnState.BOUND)
    assert [ba.status for _, ba in net.ba_log] == [144, 0]
    assert [bool(bu.force_udp) for _, bu in net.bu_log] == [True, False]
    assert net.events_of(mn.UdpEncapsulationRefused) == [mn.UdpEncapsulationRefused(144)]
    entry = net.ha.lookup(HOA)
    assert (entry.nat_detected, entry.udp_encap, net.mn.binding.udp_encap) == (False, False, False)
