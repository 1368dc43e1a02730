"""The NFQUEUE adapter with real NFQUEUE and iptables, through a stand-in engine (root).

Topology (tests/netns.py ``two_hosts``)::

    +---------------------------------+        veth         +----------------------+
    | mbp-a  rules installed          | eth0 --------- eth0 | mbp-b  plain host    |
    |        processor (this module,  |                     |        listeners,    |
    |        "serve"): queue 0 = out, |                     |        sniffer       |
    |        queue 1 = in             |                     |                      |
    | 10.66.1.1  fd66:1::1            |                     | 10.66.1.2 fd66:1::2  |
    +---------------------------------+                     +----------------------+

The stand-in engine (same contract as ``bits.engine.Engine``) drops UDP to port 9 (a DISCARD
verdict), reverses the payload of UDP to port 7777 (a changed packet: ``set_payload``), raises on
UDP to port 6666 (an engine bug: the adapter must drop, fail closed) and passes everything else as
the same object. It traces like the real engine does.

Run as ``python -m tests.test_netns_nfqueue serve NODE.toml`` it is the processor under test.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bits.errors import BitsError, ConfigError
from bits.io.control import ControlError, control_request
from bits.io.iptables import rules_install, rules_remove
from bits.io.tracefile import read_all
from bits.trace import TraceEventName, Tracer
from bits.verdict import Drop, DropReason
from mipbits.nodeconfig import NodeConfig, load_node_config
from mipbits.render import render_status, trace_tail
from tests.netns import Topology, netns_two_hosts, nstool, ping_ok, spawn_nstool, wait_until  # noqa: F401

NETNS_PREFIX = "mbp-"
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.netns


# -- the stand-in engine -------------------------------------------------------------------------


def _udp_checksum(packet: bytearray, l4: int) -> int:
    if packet[0] >> 4 == 4:
        pseudo = bytes(packet[12:20]) + struct.pack("!BBH", 0, 17, len(packet) - l4)
    else:
        pseudo = bytes(packet[8:40]) + struct.pack("!IxxxB", len(packet) - l4, 17)
    data = pseudo + bytes(packet[l4:])
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s >> 16) + (s & 0xFFFF)
    return (~s & 0xFFFF) or 0xFFFF


class StandInEngine:
    def __init__(self, tracer: Tracer, direction: object = None) -> None:
        self.tracer = tracer
        self.direction = direction
        self.reloads = 0
        self.drops = {"discard-policy": 0}
        self.passed = 0

    def process_outbound(self, packet: bytes, now: float) -> bytes | Drop:
        return self._decide(packet, "out")

    def process_inbound(self, packet: bytes, now: float) -> bytes | Drop:
        return self._decide(packet, "in")

    def _decide(self, packet: bytes, direction: str) -> bytes | Drop:
        version = packet[0] >> 4
        proto, l4 = (packet[9], (packet[0] & 0x0F) * 4) if version == 4 else (packet[6], 40)
        inner = (packet[12:16], packet[16:20]) if version == 4 else (packet[8:24], packet[24:40])
        if proto == 17 and len(packet) >= l4 + 8:
            dport = int.from_bytes(packet[l4 + 2:l4 + 4], "big")
            if dport == 9:
                self.drops["discard-policy"] += 1
                if self.tracer.wants_drops:
                    self.tracer.emit(TraceEventName.DISCARD, component="spd", direction=direction,
                                     reason=DropReason.DISCARD_POLICY, inner_src=inner[0],
                                     inner_dst=inner[1], length=len(packet))
                return Drop(DropReason.DISCARD_POLICY)
            if dport == 6666:
                raise RuntimeError("stand-in engine bug")
            if dport == 7777:
                buf = bytearray(packet)
                buf[l4 + 8:] = buf[l4 + 8:][::-1]
                buf[l4 + 6:l4 + 8] = b"\0\0"
                buf[l4 + 6:l4 + 8] = _udp_checksum(buf, l4).to_bytes(2, "big")
                return bytes(buf)
        self.passed += 1
        if self.tracer.wants_all:
            self.tracer.emit(TraceEventName.BYPASS, component="spd", direction=direction,
                             inner_src=inner[0], inner_dst=inner[1], length=len(packet))
        return packet

    def status(self) -> dict:
        return {"drops": dict(self.drops), "counts": {"passed": self.passed}, "reloads": self.reloads,
                "role": str(getattr(self.direction, "value", self.direction))}

    def query_outbound(self, sel: object) -> dict:
        return {"selectors": sel._asdict()}  # type: ignore[attr-defined]

    def query_inbound_spi(self, spi: int) -> dict:
        return {"spi": spi, "known": False}

    def reload(self) -> None:
        self.reloads += 1

    def close(self) -> None:
        marker = os.environ.get("MBP_CLOSE_MARKER")
        if marker:
            with open(marker, "a") as f:
                f.write(f"{os.getpid()} {getattr(self.direction, 'value', 'both')}\n")


def serve(cfg_path: str) -> int:
    from bits.io.nfqueue import run_processor
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    cfg = load_node_config(cfg_path)

    def factory(tracer: Tracer, direction: object) -> StandInEngine:
        if os.environ.get("MBP_FAIL_IN") and getattr(direction, "value", None) == "in":
            raise ConfigError("bad SA line", path="a.setkey", line=3)
        return StandInEngine(tracer, direction)

    try:
        return run_processor(cfg, factory)
    except BitsError as exc:  # what the command line does: one line naming the problem
        print(f"mipbits: error: {exc}", file=sys.stderr)
        return 2


# -- fixtures ------------------------------------------------------------------------------------


def write_node(tmp: Path, workers: int = 1, level: str = "all", max_bytes: int = 1 << 20) -> NodeConfig:
    p = tmp / "node.toml"
    p.write_text(f"""
[node]
name = "a"
[queues]
outbound = 0
inbound = 1
workers = {workers}
[trace]
path = "{tmp}/trace.jsonl"
level = "{level}"
max_bytes = {max_bytes}
keep = 2
[control]
socket = "{tmp}/ctl.sock"
""")
    return load_node_config(p)


class Running:
    """One processor process in namespace A."""

    def __init__(self, topo: Topology, cfg: NodeConfig, tmp: Path) -> None:
        self.topo, self.cfg, self.tmp = topo, cfg, tmp
        self.log = open(tmp / "processor.log", "ab")
        env = {**os.environ, "MBP_CLOSE_MARKER": str(tmp / "closed"), "PYTHONPATH": str(REPO)}
        self.proc = topo.spawn(topo.hosts["a"].ns, sys.executable, "-m", "tests.test_netns_nfqueue", "serve",
                               cfg.path, stderr=self.log, env=env, cwd=str(REPO))
        wait_until(self.ready, timeout=15, what=f"processor ready (log: {tmp / 'processor.log'})")

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"processor exited with {self.proc.returncode}: {self.log_text()}")
        try:
            result = control_request(self.cfg.control_socket, "ping", timeout=1)
        except ControlError:
            return False
        return all(w.get("pid") for w in result.get("workers", {}).values()) if "workers" in result else True

    def status(self) -> dict:
        return control_request(self.cfg.control_socket, "status")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        return self.topo.stop(self.proc, sig)

    def log_text(self) -> str:
        self.log.flush()
        return (self.tmp / "processor.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def topo(netns_two_hosts: Topology, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    cfg = write_node(tmp_path_factory.mktemp("rules"))
    ns = netns_two_hosts.hosts["a"].ns
    rules_install(cfg, ns)
    try:
        yield netns_two_hosts
    finally:
        rules_remove(cfg, ns)


@pytest.fixture()
def processor(topo: Topology, tmp_path: Path) -> Iterator[Running]:
    running = Running(topo, write_node(tmp_path), tmp_path)
    try:
        yield running
    finally:
        if running.proc.poll() is None:
            running.stop()
        running.log.close()


def udp_roundtrip(topo: Topology, src: str, dst_ns: str, dst: str, port: int, text: str,
                  duration: float = 1.5) -> list[str]:
    """Send one datagram from ``src`` to ``dst:port``; what the listener in ``dst_ns`` got."""
    listener = spawn_nstool(topo, dst_ns, "udp-listen", str(port), "--duration", str(duration), "--count", "1")
    nstool(topo, src, "udp-send", dst, str(port), text, check=True)
    out, _ = listener.communicate(timeout=duration + 5)
    return [line.split(" ", 1)[1] for line in out.decode().splitlines()]


def trace_records(tmp: Path) -> list[dict]:
    return list(read_all(tmp / "trace.jsonl", keep=2))


# -- tests ---------------------------------------------------------------------------------------


def test_processor_passes_icmp_udp_tcp_both_ways(processor: Running) -> None:
    topo = processor.topo
    a, b = topo.hosts["a"], topo.hosts["b"]
    for dst in (b.v4, b.v6):
        assert ping_ok(topo, a.ns, dst), dst
    for dst in (a.v4, a.v6):
        assert ping_ok(topo, b.ns, dst), dst
    assert udp_roundtrip(topo, a.ns, b.ns, b.v4, 5000, "out4") == ["out4"]
    assert udp_roundtrip(topo, a.ns, b.ns, b.v6, 5000, "out6") == ["out6"]
    assert udp_roundtrip(topo, b.ns, a.ns, a.v6, 5000, "in6") == ["in6"]
    for server_ns, client_ns, dst in ((b.ns, a.ns, b.v4), (a.ns, b.ns, a.v6)):
        echo = spawn_nstool(topo, server_ns, "tcp-echo", "5001")
        try:
            assert nstool(topo, client_ns, "tcp-check", dst, "5001", "--bytes", "300000").returncode == 0
        finally:
            topo.stop(echo)
    queues = processor.status()["processor"]["queues"]
    assert queues["0"]["direction"] == "out" and queues["1"]["direction"] == "in"
    assert queues["0"]["accepted"] > 50 and queues["1"]["accepted"] > 50  # the TCP segments went through us
    assert queues["0"]["errors"] == queues["1"]["errors"] == 0


def test_drop_verdict_drops_and_is_traced(processor: Running) -> None:
    topo = processor.topo
    a, b = topo.hosts["a"], topo.hosts["b"]
    assert udp_roundtrip(topo, a.ns, b.ns, b.v4, 9, "discard me", duration=1.0) == []
    assert udp_roundtrip(topo, b.ns, a.ns, a.v6, 9, "discard me too", duration=1.0) == []
    assert udp_roundtrip(topo, a.ns, b.ns, b.v4, 5002, "still flowing") == ["still flowing"]
    status = processor.status()
    assert status["drops"]["discard-policy"] == 2
    assert status["processor"]["queues"]["0"]["dropped"] == 1 and status["processor"]["queues"]["1"]["dropped"] == 1
    wait_until(lambda: len([r for r in trace_records(processor.tmp) if r["event"] == "discard"]) == 2,
               what="discard events in the trace")
    discards = [r for r in trace_records(processor.tmp) if r["event"] == "discard"]
    assert [(r["direction"], r["queue"], r["reason"]) for r in discards] == [
        ("out", 0, "discard-policy"), ("in", 1, "discard-policy")]
    assert (discards[0]["inner_src"], discards[0]["inner_dst"]) == (a.v4, b.v4)
    assert (discards[1]["inner_src"], discards[1]["inner_dst"]) == (b.v6, a.v6)
    assert all(isinstance(r["time"], float) and r["length"] > 28 for r in discards)


def test_changed_packet_is_reinjected(processor: Running) -> None:
    topo = processor.topo
    a, b = topo.hosts["a"], topo.hosts["b"]
    assert udp_roundtrip(topo, a.ns, b.ns, b.v4, 7777, "hello, world") == ["dlrow ,olleh"]
    assert udp_roundtrip(topo, a.ns, b.ns, b.v6, 7777, "abcdef") == ["fedcba"]
    assert udp_roundtrip(topo, b.ns, a.ns, a.v4, 7777, "inbound") == ["dnuobni"]
    queues = processor.status()["processor"]["queues"]
    assert queues["0"]["modified"] == 2 and queues["1"]["modified"] == 1


def test_engine_exception_drops_the_packet_and_keeps_running(processor: Running) -> None:
    topo = processor.topo
    a, b = topo.hosts["a"], topo.hosts["b"]
    assert udp_roundtrip(topo, a.ns, b.ns, b.v4, 6666, "boom", duration=1.0) == []
    assert udp_roundtrip(topo, a.ns, b.ns, b.v4, 5003, "after") == ["after"]
    assert processor.status()["processor"]["queues"]["0"]["errors"] == 1
    wait_until(lambda: any(r["event"] == "error" for r in trace_records(processor.tmp)), what="error event")
    (err,) = [r for r in trace_records(processor.tmp) if r["event"] == "error"]
    assert err["queue"] == 0 and "stand-in engine bug" in err["detail"]
    assert "engine raised on queue 0" in processor.log_text()


def test_control_queries_and_status_rendering(processor: Running) -> None:
    sock = processor.cfg.control_socket
    assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
    got = control_request(sock, "query_outbound", src="10.66.1.1", dst="10.66.1.2", proto="tcp", dport=80)
    assert got["selectors"]["dport"] == 80 and got["selectors"]["proto"] == 6
    assert control_request(sock, "query_inbound_spi", spi="0x100") == {"spi": 256, "known": False}
    text = render_status(processor.status())
    assert "queue 0 (out)" in text and "queue 1 (in)" in text and "role both" in text


def test_sighup_reloads(processor: Running) -> None:
    os.kill(processor.proc.pid, signal.SIGHUP)
    wait_until(lambda: processor.status()["reloads"] == 1, what="reload")
    assert processor.status()["processor"]["reloads"] == 1
    wait_until(lambda: any(r["event"] == "reload" for r in trace_records(processor.tmp)), what="reload event")


def test_sigterm_stops_cleanly_and_traffic_stays_blocked(processor: Running) -> None:
    topo = processor.topo
    a, b = topo.hosts["a"], topo.hosts["b"]
    assert ping_ok(topo, a.ns, b.v4)
    assert processor.stop(signal.SIGTERM) == 0
    assert not os.path.exists(processor.cfg.control_socket)
    assert (processor.tmp / "closed").read_text().split()[1] == "both"  # engine.close() ran
    events = [r["event"] for r in trace_records(processor.tmp)]
    assert events[0] == "start" and events[-1] == "stop"
    assert not ping_ok(topo, a.ns, b.v4, timeout_s=0.5)  # rules stay: fail closed


def _leaks(topo: Topology, send) -> int:  # type: ignore[no-untyped-def]
    """IP packets from A seen on B's wire while ``send()`` runs (ND excluded)."""
    a, b = topo.hosts["a"], topo.hosts["b"]
    sniffer = spawn_nstool(topo, b.ns, "sniff", "eth0", "--src", a.v4, a.v6, "--duration", "3")
    send()
    out, _ = sniffer.communicate(timeout=10)
    return int(out.decode().split()[-1])


def _send_everything(topo: Topology) -> None:
    a, b = topo.hosts["a"], topo.hosts["b"]
    for dst in (b.v4, b.v6):
        nstool(topo, a.ns, "udp-send", dst, "5004", "secret", "--count", "20", check=True)
        ping_ok(topo, a.ns, dst, timeout_s=0.3)
    nstool(topo, a.ns, "tcp-check", b.v4, "5005", "--bytes", "1000", "--timeout", "1")


def test_kill9_fails_closed_and_restart_recovers(processor: Running) -> None:
    topo = processor.topo
    a, b = topo.hosts["a"], topo.hosts["b"]
    assert _leaks(topo, lambda: _send_everything(topo)) > 0  # the sniffer does see traffic
    processor.stop(signal.SIGKILL)
    assert _leaks(topo, lambda: _send_everything(topo)) == 0  # nothing leaves in clear
    assert udp_roundtrip(topo, b.ns, a.ns, a.v4, 5006, "in while dead", duration=1.0) == []
    restarted = Running(topo, processor.cfg, processor.tmp)
    try:
        assert ping_ok(topo, a.ns, b.v4) and ping_ok(topo, b.ns, a.v6)
        assert udp_roundtrip(topo, a.ns, b.ns, b.v4, 5007, "back") == ["back"]
    finally:
        restarted.stop()
        restarted.log.close()


def test_trace_level_drops_writes_no_per_packet_events(topo: Topology, tmp_path: Path) -> None:
    a, b = topo.hosts["a"], topo.hosts["b"]
    running = Running(topo, write_node(tmp_path, level="drops"), tmp_path)
    try:
        assert ping_ok(topo, a.ns, b.v4)
        assert udp_roundtrip(topo, a.ns, b.ns, b.v4, 9, "x", duration=0.5) == []
    finally:
        assert running.stop() == 0
        running.log.close()
    events = [r["event"] for r in trace_records(tmp_path)]
    assert events == ["start", "discard", "stop"]


def test_trace_rotates_and_tail_follows(topo: Topology, tmp_path: Path) -> None:
    a, b = topo.hosts["a"], topo.hosts["b"]
    running = Running(topo, write_node(tmp_path, level="all", max_bytes=4096), tmp_path)
    try:
        nstool(topo, a.ns, "udp-send", b.v4, "5008", "x" * 10, "--count", "100", check=True)
        echo = spawn_nstool(topo, b.ns, "tcp-echo", "5009")
        assert nstool(topo, a.ns, "tcp-check", b.v4, "5009", "--bytes", "100000").returncode == 0
        topo.stop(echo)
    finally:
        assert running.stop() == 0
        running.log.close()
    assert (tmp_path / "trace.jsonl.1").exists()
    assert all(os.path.getsize(p) <= 4096 for p in tmp_path.glob("trace.jsonl*") if not p.name.endswith(".lock"))
    import io

    out = io.StringIO()
    assert trace_tail(str(tmp_path / "trace.jsonl"), lines=5, event="stop", out=out) == 1
    assert "stop" in out.getvalue() and "[nfqueue]" in out.getvalue()


def test_two_workers_split_by_direction(topo: Topology, tmp_path: Path) -> None:
    a, b = topo.hosts["a"], topo.hosts["b"]
    running = Running(topo, write_node(tmp_path, workers=2), tmp_path)
    try:
        assert ping_ok(topo, a.ns, b.v4) and ping_ok(topo, b.ns, a.v6)
        assert udp_roundtrip(topo, a.ns, b.ns, b.v4, 9, "drop", duration=0.5) == []
        assert udp_roundtrip(topo, a.ns, b.ns, b.v6, 7777, "ab") == ["ba"]
        status = running.status()
        workers = status["processor"]["workers"]
        assert set(workers["out"]["queues"]) == {"0"} and set(workers["in"]["queues"]) == {"1"}
        assert workers["out"]["pid"] != workers["in"]["pid"]
        assert status["drops"]["discard-policy"] == 1
        assert "out worker:" in render_status(status)
        os.kill(running.proc.pid, signal.SIGHUP)  # forwarded to both workers
        wait_until(lambda: running.status()["reloads"] == 2, what="both workers reloaded")
    finally:
        assert running.stop() == 0
        running.log.close()
    closed = sorted(line.split()[1] for line in (tmp_path / "closed").read_text().splitlines())
    assert closed == ["in", "out"]
    assert not os.path.exists(running.cfg.control_socket)


def test_two_workers_kill9_supervisor_takes_workers_down(topo: Topology, tmp_path: Path) -> None:
    running = Running(topo, write_node(tmp_path, workers=2), tmp_path)
    workers = running.status()["processor"]["workers"]
    pids = [workers["out"]["pid"], workers["in"]["pid"]]
    running.stop(signal.SIGKILL)
    running.log.close()

    def gone() -> bool:
        return not any(os.path.exists(f"/proc/{pid}") and "Z" not in _state(pid) for pid in pids)

    wait_until(gone, timeout=10, what="workers to exit after their supervisor died")
    assert _leaks(topo, lambda: _send_everything(topo)) == 0


def test_two_workers_startup_error_is_reported_and_nothing_is_left(topo: Topology, tmp_path: Path) -> None:
    cfg = write_node(tmp_path, workers=2)
    log = open(tmp_path / "processor.log", "wb")
    env = {**os.environ, "MBP_FAIL_IN": "1", "PYTHONPATH": str(REPO)}
    proc = topo.spawn(topo.hosts["a"].ns, sys.executable, "-m", "tests.test_netns_nfqueue", "serve", cfg.path,
                      stderr=log, env=env, cwd=str(REPO))
    assert proc.wait(30) == 2
    log.close()
    text = (tmp_path / "processor.log").read_text()
    assert "mipbits: error: in worker: a.setkey:3: bad SA line" in text
    pids = subprocess.run(["ip", "netns", "pids", topo.hosts["a"].ns], capture_output=True, text=True).stdout.split()
    assert not [p for p in pids if "test_netns_nfqueue" in _cmdline(p)]
    assert not os.path.exists(cfg.control_socket)


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:
        return ""


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except OSError:
        return "Z"


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "serve":
    sys.exit(serve(sys.argv[2]))
