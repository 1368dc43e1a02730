"""Tracer levels and schema, the JSON Lines writer (rotation), the follower and the renderers."""

from __future__ import annotations

import io
import ipaddress
import json
import os

import pytest

from bits.constants import Direction
from bits.errors import ConfigError
from bits.io.tracefile import TraceFollower, TraceSettings, TraceWriter, open_trace_writer, read_all
from bits.trace import FIELDS, NOTABLE_EVENTS, TraceEvent, TraceEventName, TraceLevel, Tracer
from bits.verdict import DropReason
from mipbits.render import EventFilter, format_event, trace_tail

V4A, V4B = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
V6A = ipaddress.IPv6Address("2001:db8::1").packed


def collecting(level: str) -> tuple[Tracer, list[dict]]:
    got: list[dict] = []
    return Tracer(got.append, level, component="esp"), got


# -- Tracer --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "drops", "all_"),
    [("off", False, False), ("drops", True, False), ("all", True, True), ("ALL", True, True)],
)
def test_level_flags(level: str, drops: bool, all_: bool) -> None:
    tracer, _ = collecting(level)
    assert (tracer.wants_drops, tracer.wants_all) == (drops, all_)


def test_no_sink_means_nothing_wanted() -> None:
    tracer = Tracer(None, "all")
    assert not tracer.wants_all and not tracer.wants_drops
    tracer.emit("encap", spi=1)  # must not raise


def test_bad_level_is_config_error() -> None:
    with pytest.raises(ConfigError, match="off, drops or all"):
        TraceLevel.parse("verbose")


@pytest.mark.parametrize("level", ["off", "drops", "all"])
def test_emit_filters_by_level(level: str) -> None:
    tracer, got = collecting(level)
    for name in ("encap", "decap", "bypass", "drop", "discard", "start"):
        tracer.emit(name)
    names = [r["event"] for r in got]
    expected = {"off": [], "drops": ["drop", "discard", "start"],
                "all": ["encap", "decap", "bypass", "drop", "discard", "start"]}[level]
    assert names == expected


def test_notable_events_are_what_drops_level_keeps() -> None:
    assert {"drop", "discard", "error"} <= NOTABLE_EVENTS
    assert not {"encap", "decap", "bypass"} & NOTABLE_EVENTS


def test_record_schema_normalises_fields() -> None:
    tracer, got = collecting("all")
    tracer.queue = 3
    tracer.emit(TraceEventName.DROP, direction=Direction.IN, reason=DropReason.REPLAY, spi=0x1000, seq=7,
                inner_src=V4A, inner_dst=ipaddress.ip_address("10.0.0.2"), outer_src=V6A,
                outer_dst="2001:db8::2", length=120, sa_state="mature", detail=None)
    (record,) = got
    assert record == {"time": None, "component": "esp", "direction": "in", "event": "drop", "reason": "replay",
                      "spi": 4096, "seq": 7, "inner_src": "10.0.0.1", "inner_dst": "10.0.0.2",
                      "outer_src": "2001:db8::1", "outer_dst": "2001:db8::2", "length": 120,
                      "queue": 3, "sa_state": "mature"}
    assert list(record)[:3] == ["time", "component", "event"]  # the sink stamps time
    assert set(record) - {"sa_state"} <= set(FIELDS)
    json.dumps(record)  # JSON-able as is


def test_bad_address_does_not_raise() -> None:
    tracer, got = collecting("all")
    tracer.emit("drop", inner_src=b"\x01\x02\x03")
    assert got[0]["inner_src"] == repr(b"\x01\x02\x03")


def test_component_override_and_event_record_roundtrip() -> None:
    tracer, got = collecting("all")
    tracer.emit("start", component="nfqueue", detail="pid 1")
    ev = TraceEvent.from_record({**got[0], "unknown": 1})
    assert (ev.component, ev.event, ev.detail, ev.spi) == ("nfqueue", "start", "pid 1", None)


def test_set_level_at_runtime() -> None:
    tracer, got = collecting("off")
    tracer.emit("drop")
    tracer.set_level(TraceLevel.DROPS)
    tracer.emit("drop")
    assert len(got) == 1


# -- writer / rotation ---------------------------------------------------------------------------


def lines_of(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_writer_buffers_until_flush_and_stamps_time(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    w = TraceWriter(path, clock=lambda: 1000.5)
    w.write({"event": "drop"})
    assert path.read_text() == ""  # buffered: the data path pays no write(2) per event
    w.flush()
    assert lines_of(str(path)) == [{"time": 1000.5, "event": "drop"}]
    w.write({"time": 3.0, "event": "encap"})
    w.close()
    assert lines_of(str(path))[1] == {"time": 3.0, "event": "encap"}


def test_rotation_by_size_keeps_n_files(tmp_path) -> None:
    path = str(tmp_path / "t.jsonl")
    w = TraceWriter(path, max_bytes=4096, keep=2, clock=lambda: 0.0)
    for i in range(600):  # ~40 bytes a line: several rotations
        w.write({"event": "encap", "seq": i})
        w.flush()
    w.close()
    assert sorted(os.listdir(tmp_path)) == ["t.jsonl", "t.jsonl.1", "t.jsonl.2", "t.jsonl.lock"]
    for name in ("t.jsonl", "t.jsonl.1", "t.jsonl.2"):
        assert os.path.getsize(tmp_path / name) <= 4096
    seqs = [r["seq"] for r in read_all(path, keep=2)]
    assert seqs == list(range(seqs[0], 600))  # contiguous, newest kept, oldest dropped
    assert seqs[0] > 0


def test_one_big_batch_is_split_across_rotations(tmp_path) -> None:
    path = str(tmp_path / "t.jsonl")
    w = TraceWriter(path, max_bytes=4096, keep=10, clock=lambda: 0.0)
    for i in range(400):  # < the flush threshold: one batch of ~16 KB
        w.write({"event": "encap", "seq": i})
    w.close()
    rotated = [f"{path}.{n}" for n in range(1, 11) if os.path.exists(f"{path}.{n}")]
    assert len(rotated) >= 2
    sizes = [os.path.getsize(p) for p in rotated]
    assert max(sizes + [os.path.getsize(path)]) <= 4096 and min(sizes) > 4096 - 100  # filled, never overfilled
    assert [r["seq"] for r in read_all(path, keep=10)] == list(range(400))


def test_rotation_keep_zero_truncates(tmp_path) -> None:
    path = str(tmp_path / "t.jsonl")
    w = TraceWriter(path, max_bytes=4096, keep=0)
    for i in range(300):
        w.write({"seq": i})
        w.flush()
    w.close()
    assert not os.path.exists(path + ".1")
    assert lines_of(path)[-1]["seq"] == 299


def test_two_writers_share_one_file_across_rotation(tmp_path) -> None:
    path = str(tmp_path / "t.jsonl")
    a = TraceWriter(path, max_bytes=4096, keep=5, clock=lambda: 0.0)
    b = TraceWriter(path, max_bytes=4096, keep=5, clock=lambda: 0.0)
    for i in range(200):
        (a if i % 2 else b).write({"w": "ab"[i % 2], "i": i})
        (a if i % 2 else b).flush()
    a.close()
    b.close()
    got = sorted(r["i"] for r in read_all(path, keep=5))
    assert got == list(range(200))  # nothing lost, nothing written into a deleted file
    for n in range(1, 6):
        if os.path.exists(f"{path}.{n}"):
            assert all(isinstance(r, dict) for r in lines_of(f"{path}.{n}"))


def test_unencodable_record_becomes_an_error_line(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    w = TraceWriter(path, clock=lambda: 1.0)
    loop: dict = {}
    loop["self"] = loop
    w.write({"event": "drop", "odd": loop})  # must not raise into the engine
    w.close()
    (record,) = lines_of(str(path))
    assert record["event"] == "error" and "unencodable" in record["detail"]


def test_full_disk_loses_lines_not_packets() -> None:
    w = TraceWriter("/dev/full", clock=lambda: 1.0)
    w.write({"event": "drop"})
    w.flush()  # ENOSPC: counted, not raised
    assert w.errors == 1
    w.close()


def test_open_trace_writer_off_or_pathless(tmp_path) -> None:
    assert open_trace_writer(TraceSettings(None, TraceLevel.ALL)) is None
    assert open_trace_writer(TraceSettings(str(tmp_path / "x"), TraceLevel.OFF)) is None
    w = open_trace_writer(TraceSettings(str(tmp_path / "x"), TraceLevel.DROPS))
    assert isinstance(w, TraceWriter)
    w.close()


# -- follower ------------------------------------------------------------------------------------


def append(path: str, *records: dict, newline: bool = True) -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) if newline else json.dumps(records[0]))


def test_follower_starts_at_end_and_sees_appends(tmp_path) -> None:
    path = str(tmp_path / "t.jsonl")
    append(path, {"i": 0})
    f = TraceFollower(path)
    assert f.poll() == []
    append(path, {"i": 1}, {"i": 2})
    assert [r["i"] for r in f.poll()] == [1, 2]
    assert f.poll() == []


def test_follower_waits_for_a_file_that_does_not_exist_yet(tmp_path) -> None:
    path = str(tmp_path / "later.jsonl")
    f = TraceFollower(path)
    assert f.poll() == []
    append(path, {"i": 1})
    assert [r["i"] for r in f.poll()] == [1]


def test_follower_keeps_partial_line_until_newline(tmp_path) -> None:
    path = str(tmp_path / "t.jsonl")
    open(path, "w").close()
    f = TraceFollower(path)
    with open(path, "a") as fh:
        fh.write('{"i": 1}\n{"i"')
    assert [r["i"] for r in f.poll()] == [1]
    with open(path, "a") as fh:
        fh.write(': 2}\nnot json\n')
    assert [r["i"] for r in f.poll()] == [2]
    assert f.bad_lines == 1


def test_follower_follows_rotation_without_losing_lines(tmp_path) -> None:
    path = str(tmp_path / "t.jsonl")
    w = TraceWriter(path, max_bytes=4096, keep=3, clock=lambda: 0.0)
    f = TraceFollower(path)
    seen = []
    for i in range(400):
        w.write({"i": i})
        w.flush()
        if i % 7 == 0:
            seen += [r["i"] for r in f.poll()]
    w.close()
    seen += [r["i"] for r in f.poll()]
    assert os.path.exists(path + ".1")  # it did rotate
    assert seen == list(range(400))


def test_follower_survives_truncation(tmp_path) -> None:
    path = str(tmp_path / "t.jsonl")
    append(path, {"i": 0}, {"i": 1})
    f = TraceFollower(path, from_start=True)
    assert len(f.poll()) == 2
    with open(path, "w") as fh:  # truncate in place (copytruncate style)
        fh.write(json.dumps({"i": 9}) + "\n")
    assert [r["i"] for r in f.poll()] == [9]


# -- rendering -----------------------------------------------------------------------------------


RECORDS = [
    {"time": 0.5, "component": "esp", "direction": "out", "event": "encap", "spi": 4096, "seq": 1,
     "inner_src": "10.0.0.1", "inner_dst": "10.0.0.2", "outer_src": "192.0.2.1",
     "outer_dst": "192.0.2.2", "length": 140, "queue": 0},
    {"time": 1.0, "component": "esp", "direction": "in", "event": "drop", "reason": "replay",
     "spi": 8192, "seq": 1, "outer_src": "192.0.2.2", "outer_dst": "192.0.2.1", "queue": 1},
    {"time": 2.0, "component": "spd", "direction": "out", "event": "bypass",
     "inner_src": "2001:db8::1", "inner_dst": "2001:db8::2", "length": 80},
]


def test_format_event_plain() -> None:
    line = format_event(RECORDS[0])
    assert "\x1b" not in line
    for part in ("out", "encap", "spi 0x00001000", "seq 1", "10.0.0.1 > 10.0.0.2",
                 "via 192.0.2.1 > 192.0.2.2", "len 140", "q 0"):
        assert part in line
    assert "replay" in format_event(RECORDS[1])


def test_format_event_colour_marks_drops_red() -> None:
    line = format_event(RECORDS[1], colour=True)
    assert "\x1b[31m" in line and line.count("\x1b[0m") >= 1


def test_format_event_tolerates_garbage() -> None:
    assert "?" in format_event({"time": "x"})


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({}, [0, 1, 2]), ({"spi": "0x1000"}, [0]), ({"spi": 8192}, [1]), ({"event": "drop,bypass"}, [1, 2]),
     ({"addr": "192.0.2.2"}, [0, 1]), ({"addr": "2001:db8::/64"}, [2]), ({"addr": "10.0.0.2", "event": "drop"}, [])],
)
def test_event_filter(kwargs: dict, expected: list[int]) -> None:
    keep = EventFilter(**kwargs)
    assert [i for i, r in enumerate(RECORDS) if keep(r)] == expected


def write_records(path: str, records: list[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_trace_tail_backlog_includes_rotated_files_and_filters(tmp_path) -> None:
    path = str(tmp_path / "t.jsonl")
    write_records(path + ".1", RECORDS[:2])
    write_records(path, RECORDS[2:])
    out = io.StringIO()
    assert trace_tail(path, out=out, lines=10) == 3
    text = out.getvalue().splitlines()
    assert ["encap" in text[0], "drop" in text[1], "bypass" in text[2]] == [True] * 3
    assert "\x1b" not in out.getvalue()  # StringIO is not a tty: plain
    out = io.StringIO()
    assert trace_tail(path, out=out, lines=1, as_json=True) == 1
    assert json.loads(out.getvalue()) == RECORDS[2]
    out = io.StringIO()
    trace_tail(path, out=out, spi=8192, as_json=True)
    assert [json.loads(x)["spi"] for x in out.getvalue().splitlines()] == [8192]


def test_trace_tail_follow_prints_new_events(tmp_path) -> None:
    path = str(tmp_path / "t.jsonl")
    write_records(path, RECORDS[:1])
    out = io.StringIO()
    polls = iter(range(100))

    def stop() -> bool:
        n = next(polls)
        if n == 1:
            append(path, RECORDS[1], RECORDS[2])
        return n >= 3

    printed = trace_tail(path, follow=True, out=out, event="drop", as_json=True, interval=0, stop=stop)
    assert printed == 1
    assert json.loads(out.getvalue())["reason"] == "replay"
