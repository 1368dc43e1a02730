"""The NFQUEUE adapter's logic without a kernel (no root): verdicts, counters, errors, reload.

The same code runs against real NFQUEUE in tests/test_netns_nfqueue.py.
"""

from __future__ import annotations

import pytest

from bits.constants import Direction
from bits.io.nfqueue import (
    ACCEPTED,
    DROPPED,
    ERRORS,
    HOUSEKEEPING_EVERY,
    MODIFIED,
    Processor,
    ProcessorError,
    QueueSettings,
    _check_queues,
    make_callback,
)
from bits.trace import Tracer
from bits.verdict import Drop, DropReason


class FakePacket:
    """The slice of netfilterqueue.Packet the adapter uses; refuses a second verdict like it."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.given: bytes | None = None
        self.verdict: str | None = None

    def get_payload(self) -> bytes:
        return self.payload

    def set_payload(self, payload: bytes) -> None:
        if type(payload) is not bytes:
            raise TypeError("set_payload wants bytes")
        self.given = payload

    def _set(self, verdict: str) -> None:
        if self.verdict is not None:
            raise RuntimeError("Verdict already given for this packet")
        self.verdict = verdict

    def accept(self) -> None:
        self._set("accept")

    def drop(self) -> None:
        self._set("drop")


def run(process, payload: bytes = b"\x45" + b"\0" * 27, tracer: Tracer | None = None):  # type: ignore[no-untyped-def]
    counts = [0, 0, 0, 0]
    errors: list[BaseException] = []
    cb, _ = make_callback(process, counts, tracer or Tracer(), 3, lambda exc, q: errors.append(exc))
    pkt = FakePacket(payload)
    cb(pkt)
    return pkt, counts, errors


def test_same_object_is_accepted_unchanged() -> None:
    pkt, counts, _ = run(lambda p, now: p)
    assert (pkt.verdict, pkt.given) == ("accept", None)
    assert counts[ACCEPTED] == 1 and sum(counts) == 1


def test_new_bytes_replace_the_payload() -> None:
    pkt, counts, _ = run(lambda p, now: b"ESP" + p)
    assert pkt.verdict == "accept" and pkt.given is not None and pkt.given.startswith(b"ESP")
    assert counts[MODIFIED] == 1


def test_equal_copy_counts_as_modified_and_is_set() -> None:
    pkt, counts, _ = run(lambda p, now: bytes(bytearray(p)))
    assert pkt.verdict == "accept" and pkt.given == pkt.payload and counts[MODIFIED] == 1


def test_bytearray_result_is_converted() -> None:
    pkt, counts, _ = run(lambda p, now: bytearray(b"new"))
    assert pkt.given == b"new" and counts[MODIFIED] == 1


@pytest.mark.parametrize("result", [Drop(DropReason.REPLAY, 1, 2), b"", None])
def test_drop_empty_and_none_are_dropped(result: object) -> None:
    pkt, counts, _ = run(lambda p, now: result)
    assert pkt.verdict == "drop" and pkt.given is None
    assert counts[DROPPED] == 1


def test_engine_exception_drops_fail_closed() -> None:
    def boom(p: bytes, now: float) -> bytes:
        raise ValueError("bug")

    pkt, counts, errors = run(boom)
    assert pkt.verdict == "drop" and counts[ERRORS] == 1
    assert [str(e) for e in errors] == ["bug"]


def test_odd_result_type_is_an_error_not_an_accept() -> None:
    pkt, counts, errors = run(lambda p, now: {"not": "bytes"})
    assert pkt.verdict == "drop" and counts[ERRORS] == 1 and errors


def test_now_comes_from_the_clock_and_queue_reaches_the_tracer() -> None:
    seen = []
    got: list[dict] = []
    tracer = Tracer(got.append, "drops")
    counts = [0] * 4
    cb, _ = make_callback(lambda p, now: seen.append(now) or p, counts, tracer, 7, lambda e, q: None,
                          clock=lambda: 42.0)
    cb(FakePacket(b"x"))
    assert seen == [42.0] and tracer.queue == 7


def test_housekeeping_every_n_packets() -> None:
    calls = []
    cb, _ = make_callback(lambda p, now: p, [0] * 4, Tracer(), 0, lambda e, q: None, lambda: calls.append(1))
    for _ in range(HOUSEKEEPING_EVERY * 3 + 5):
        cb(FakePacket(b"x"))
    assert len(calls) == 3


def test_set_process_swaps_the_engine() -> None:
    counts = [0] * 4
    cb, set_process = make_callback(lambda p, now: p, counts, Tracer(), 0, lambda e, q: None)
    cb(FakePacket(b"x"))
    set_process(lambda p, now: Drop(DropReason.NO_SA))
    cb(FakePacket(b"x"))
    assert counts[ACCEPTED] == 1 and counts[DROPPED] == 1


class Reloadable:
    def __init__(self) -> None:
        self.reloaded = 0

    def process_outbound(self, p: bytes, now: float) -> bytes:
        return p

    process_inbound = process_outbound

    def status(self) -> dict:
        return {}

    def reload(self) -> None:
        self.reloaded += 1


def test_reload_default_calls_engine_reload_and_hook_can_replace() -> None:
    engine = Reloadable()
    proc = Processor(engine, [(0, Direction.OUT), (1, Direction.IN)], Tracer())
    try:
        proc.request_reload()
        proc._housekeeping()
        assert engine.reloaded == 1 and proc.reloads == 1
        replacement = Reloadable()
        proc.on_reload = lambda old: replacement
        proc.request_reload()
        proc._housekeeping()
        assert proc.engine is replacement
        status = proc.processor_status()
        assert status["reloads"] == 2 and status["queues"]["1"]["direction"] == "in"
    finally:
        proc.close()


def test_failed_reload_keeps_the_running_engine() -> None:
    engine = Reloadable()
    proc = Processor(engine, [(0, Direction.OUT)], Tracer())

    def bad(old: object) -> None:
        raise ValueError("bad config line 3")

    proc.on_reload = bad
    try:
        proc.request_reload()
        proc._housekeeping()
        assert proc.engine is engine and proc.reloads == 0
    finally:
        proc.close()


@pytest.mark.parametrize(
    ("settings", "message"),
    [(QueueSettings(workers=3), "workers must be 1 or 2"), (QueueSettings(outbound=(1,), inbound=(1,)), "both"),
     (QueueSettings(inbound=()), "outbound and an inbound")],
)
def test_queue_settings_checked(settings: QueueSettings, message: str) -> None:
    with pytest.raises(ProcessorError, match=message):
        _check_queues(settings)


class Timed(Reloadable):
    def __init__(self, deadline: float) -> None:
        super().__init__()
        self.deadline = deadline
        self.handled: list[float] = []
        self.asked = 0

    def next_timer(self) -> float | None:
        self.asked += 1
        return self.deadline

    def handle_timer(self, now: float) -> None:
        self.handled.append(now)
        self.deadline = now + 3600


def test_engine_timers_run_when_due_and_are_not_polled_per_packet() -> None:
    engine = Timed(deadline=0.0)  # already due
    proc = Processor(engine, [(0, Direction.OUT)], Tracer())
    try:
        proc._housekeeping()
        assert len(engine.handled) == 1
        asked = engine.asked
        for _ in range(100):
            proc._housekeeping()  # deadline far away: next_timer() not asked again for a while
        assert engine.asked == asked and len(engine.handled) == 1
    finally:
        proc.close()
