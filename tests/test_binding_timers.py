"""mobility.timers: the Deadlines table and the RFC 6275 / RFC 5555 timer formulas."""

from __future__ import annotations

from hypothesis import given, strategies as st

from mobility.timers import (
    Deadlines,
    bce_expiry,
    bce_purge_deadline,
    brr_deadline,
    initial_bindack_timeout,
    mn_binding_expiry,
    nat_keepalive_interval,
    next_bindack_timeout,
    rate_limited_send_time,
    refresh_deadline,
)


def drain(d: Deadlines, now: float) -> list:
    out = []
    while (key := d.pop_due(now)) is not None:
        out.append(key)
    return out


def test_deadlines_order_cancel_and_rearm():
    d: Deadlines[str] = Deadlines()
    d.arm("a", 5.0)
    d.arm("b", 3.0)
    d.arm("c", 4.0)
    d.cancel("c")
    d.arm("a", 2.0)  # re-armed earlier
    assert d.next() == 2.0 and d.get("a") == 2.0 and "c" not in d and len(d) == 2
    assert d.pop_due(1.9) is None
    assert drain(d, 10.0) == ["a", "b"] and d.next() is None


def test_ties_follow_the_latest_arming():
    """A key re-armed at the same time queues behind keys armed in between (the MN relies on
    REFRESH running before EXPIRY when both fall due together)."""
    d: Deadlines[str] = Deadlines()
    d.arm("expiry", 0.0)
    d.arm("refresh", 0.0)
    d.arm("expiry", 0.0)
    assert drain(d, 0.0) == ["refresh", "expiry"]


@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.one_of(st.none(), st.integers(0, 50))), max_size=200))
def test_deadlines_match_a_dict_model(ops):
    d: Deadlines[str] = Deadlines()
    model: dict[str, tuple[int, int]] = {}
    for i, (key, when) in enumerate(ops):
        if when is None:
            d.cancel(key)
            model.pop(key, None)
        else:
            d.arm(key, when)
            model[key] = (when, i)
    assert d.next() == (min(w for w, _ in model.values()) if model else None)
    assert drain(d, 1e9) == [k for k, _ in sorted(model.items(), key=lambda kv: kv[1])]


def test_mn_formulas():
    assert initial_bindack_timeout(True, 1.5) == 1.5 and initial_bindack_timeout(False, 1.5) == 1.0
    t, seen = 1.5, []
    for _ in range(8):
        t = next_bindack_timeout(t)
        seen.append(t)
    assert seen == [3.0, 6.0, 12.0, 24.0, 32.0, 32.0, 32.0, 32.0]
    assert rate_limited_send_time([0.0, 0.2], 0.3) == 0.3
    assert rate_limited_send_time([0.0, 0.2, 0.4], 0.5) == 1.0
    assert rate_limited_send_time([0.0, 0.2, 0.4], 1.5) == 1.5
    assert mn_binding_expiry(10.0, 240) == 250.0


def test_refresh_deadline_takes_the_earliest():
    assert refresh_deadline(10.0, 100.0) == 90.0
    assert refresh_deadline(10.0, 100.0, advice=40.0) == 50.0
    assert refresh_deadline(10.0, 1000.0, advice=400.0, nat_keepalive=110.0) == 120.0
    assert refresh_deadline(0.0, 100.0, ratio=0.9) == 90.0


def test_nat_keepalive_interval():
    assert nat_keepalive_interval(0xFFFFFFFF) is None
    assert nat_keepalive_interval(None) is None
    assert nat_keepalive_interval(0) == 110.0 and nat_keepalive_interval(0, default=20.0) == 20.0
    assert nat_keepalive_interval(30) == 30.0


def test_ha_formulas():
    assert bce_expiry(5.0, 15) == 65.0
    assert bce_purge_deadline(5.0) == 15.0
    assert brr_deadline(100.0, 0.0, 20.0) == 80.0
    assert brr_deadline(100.0, 90.0, 20.0) is None and brr_deadline(100.0, 0.0, None) is None
