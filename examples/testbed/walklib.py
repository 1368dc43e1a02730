"""Driving the testbed from Python: what scripts/demo-walk and tests/test_netns_handover.py share.

``Testbed`` wraps scripts/testbed (namespaces, moves, processes it spawns and stops by PID) and
starts mipbits on the HA and the MN with configurations rendered into its run directory (the
examples of this directory with their run-time paths moved there, so two testbeds with different
prefixes never share a socket). ``wire_packets`` reads a tcpdump capture (outer addresses and SPI
of every ESP packet), ``ping_window`` cuts traffic.py's ping report into the time of one move.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:  # run from a checkout without the package installed
    sys.path.insert(0, str(REPO))

from bits.errors import ParseError  # noqa: E402
from bits.io.control import ControlError, control_request  # noqa: E402
from bits.io.pcap import read_pcap  # noqa: E402

TESTBED = REPO / "scripts" / "testbed"
TRAFFIC = HERE / "traffic.py"
EXAMPLE_RUN = "/run/mipbits-testbed"  # what the example configurations say
HOA = "2001:db8:1::100"
HA = "2001:db8:1::1"
CN = "2001:db8:c::50"
COA = {"v1": "2001:db8:a1::ff:fe00:a1", "v2": "2001:db8:a2::ff:fe00:a2"}
WALK = ("v1", "v2", "v1", "home")  # from home, back home
SPI_NAMES = {0x1001: "BU", 0x1002: "BA", 0x1007: "data", 0x1008: "data"}  # examples/testbed/*.setkey


class TestbedError(RuntimeError):
    pass


class Testbed:
    """One testbed (namespaces ``PREFIX{cn,r,ha,mn}``) and what runs in it."""

    __test__ = False  # not a pytest test class (tests import this module)

    def __init__(self, prefix: str = "mbn-", run_dir: str | None = None, python: str = sys.executable) -> None:
        self.prefix = prefix
        self.run_dir = Path(run_dir or f"{EXAMPLE_RUN}/{prefix.rstrip('-')}")
        self.python = python
        self.spawned: list[str] = []

    # --- scripts/testbed ---

    def testbed(self, *args: str, timeout: float = 60) -> str:
        done = subprocess.run([str(TESTBED), "-p", self.prefix, "-r", str(self.run_dir), *args],
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise TestbedError(f"scripts/testbed {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def up(self) -> None:
        self.testbed("up")

    def down(self) -> None:
        self.testbed("down")

    def move(self, where: str) -> None:
        self.testbed("move", where)

    def ns(self, node: str) -> str:
        return f"{self.prefix}{node}"

    def exec(self, node: str, *argv: str, check: bool = True, timeout: float = 30,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["ip", "netns", "exec", self.ns(node), *argv], capture_output=True, text=True,
                              timeout=timeout, input=input)
        if check and done.returncode != 0:
            raise TestbedError(f"{node}: {' '.join(argv)}: {done.stderr.strip()}")
        return done

    def spawn(self, name: str, node: str, *argv: str) -> int:
        pid = int(self.testbed("spawn", name, node, *argv).split()[-1])
        self.spawned.append(name)
        return pid

    def stop(self, name: str) -> None:
        self.testbed("stop", name)
        with contextlib.suppress(ValueError):
            self.spawned.remove(name)

    def log(self, name: str) -> str:
        try:
            return (self.run_dir / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, name: str, text: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log(name)
            if text in log:
                return log
            time.sleep(0.05)
        raise TestbedError(f"{name}: no {text!r} within {timeout} s; log:\n{self.log(name)[-3000:]}")

    def last_json(self, name: str) -> dict[str, Any]:
        """The last JSON line a process wrote to its log (traffic.py's reports)."""
        for line in reversed(self.log(name).splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        raise TestbedError(f"{name}: no report in its log:\n{self.log(name)[-3000:]}")

    # --- mipbits on the HA and the MN ---

    def config(self, node: str) -> Path:
        return self.run_dir / "config" / f"{node}.toml"

    def socket(self, node: str) -> str:
        return f"{self.run_dir}/{node}.sock"

    def render_configs(self, trace_level: str = "drops") -> None:
        """The example configurations with their run-time files under our run directory."""
        out = self.run_dir / "config"
        out.mkdir(parents=True, exist_ok=True)
        for node in ("ha", "mn"):
            text = (HERE / f"{node}.toml").read_text().replace(EXAMPLE_RUN, str(self.run_dir))
            text = text.replace('level = "drops"', f'level = "{trace_level}"')
            (out / f"{node}.toml").write_text(text)
            key = out / f"{node}.setkey"
            shutil.copyfile(HERE / f"{node}.setkey", key)
            os.chmod(key, 0o600)

    def start_mipbits(self, node: str, mode: str) -> int:
        return self.spawn(f"mipbits-{node}", node, self.python, "-m", "mipbits.cli", "run", "-c",
                          str(self.config(node)), "--mode", mode)

    def wait_ready(self, node: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ControlError, OSError):
                control_request(self.socket(node) + ".mobility", "ping", timeout=1)
                return
            if "error" in self.log(f"mipbits-{node}"):
                break
            time.sleep(0.1)
        raise TestbedError(f"mipbits on {node} did not start:\n{self.log(f'mipbits-{node}')[-3000:]}")

    def mobility(self, node: str) -> dict[str, Any]:
        return control_request(self.socket(node) + ".mobility", "status")  # type: ignore[no-any-return]

    def engine(self, node: str) -> dict[str, Any]:
        return control_request(self.socket(node), "status")  # type: ignore[no-any-return]

    def wait_registration(self, where: str, after: int, timeout: float = 15) -> dict[str, Any]:
        """The MN's next completed registration (history entry number ``after``) for ``where``."""
        want = HOA if where == "home" else COA[where]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.mobility("mn")
            history = st["history"]
            for entry in history[after:] if len(history) > after else []:
                if ipaddress.ip_address(entry["coa"]) == ipaddress.ip_address(want) and entry["kind"] != "refresh":
                    return {**entry, "ba_time": st["time"] - (st["monotonic"] - entry["at"])}  # wall clock
            time.sleep(0.02)
        raise TestbedError(f"no registration for {where} within {timeout} s: {self.mobility('mn')}")

    # --- traffic and captures ---

    def traffic(self, name: str, node: str, *args: str) -> None:
        self.spawn(name, node, self.python, str(TRAFFIC), *args)
        self.wait_log(name, "ready")

    def capture(self, name: str, node: str, iface: str, snaplen: int = 0) -> Path:
        path = self.run_dir / f"{name}.pcap"
        self.spawn(name, node, "tcpdump", "-n", "-U", "-Z", "root", "-i", iface, "-s", str(snaplen), "-w", str(path), "ip6")
        self.wait_log(name, "listening on")
        return path

    def stop_all(self) -> None:
        for name in reversed(list(self.spawned)):
            with contextlib.suppress(TestbedError, subprocess.TimeoutExpired):
                self.stop(name)


# --- what the captures and the ping say ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WirePacket:
    ts: float
    src: str
    dst: str
    spi: int | None  # None: not ESP
    proto: int  # the IPv6 Next Header of the fixed header
    packet: bytes


def wire_packets(pcap: Path) -> list[WirePacket]:
    """Every IPv6 packet of a capture with its outer addresses and, for ESP, its SPI."""
    out = []
    with open(pcap, "rb") as f, contextlib.suppress(ParseError):  # still being written: a record cut short
        for rec in read_pcap(f):
            pkt = rec.packet
            if len(pkt) < 40 or pkt[0] >> 4 != 6:
                continue
            out.append(WirePacket(rec.ts, str(ipaddress.IPv6Address(pkt[8:24])), str(ipaddress.IPv6Address(pkt[24:40])),
                                  esp_spi(pkt), pkt[6], pkt))
    return out


def esp_spi(pkt: bytes) -> int | None:
    """The SPI when the IPv6 header chain (hop-by-hop, routing, destination options) ends in ESP;
    tolerates a capture cut short after the ESP header (``pull_esp_view`` insists on whole packets)."""
    nh, off = pkt[6], 40
    while nh in (0, 43, 60) and off + 8 <= len(pkt):
        nh, off = pkt[off], off + (pkt[off + 1] + 1) * 8
    if nh != 50 or off + 8 > len(pkt):
        return None
    return int.from_bytes(pkt[off:off + 4], "big")


def esp_summary(packets: Iterable[WirePacket], t0: float, t1: float) -> Counter[tuple[str, str, str]]:
    """ESP packets sent in [t0, t1) by (outer source, outer destination, what the SPI carries)."""
    return Counter((p.src, p.dst, SPI_NAMES.get(p.spi, f"spi {p.spi:#x}"))  # type: ignore[arg-type]
                   for p in packets if p.spi is not None and t0 <= p.ts < t1)


def ping_window(probes: Sequence[Sequence[Any]], t0: float, t1: float) -> dict[str, Any]:
    """Probes sent in [t0, t1): how many, how many unanswered, the longest time without an answered
    probe (the interruption a user would notice)."""
    window = [p for p in probes if t0 <= p[1] < t1]
    answered = [p[1] for p in window if p[2] is not None]
    marks = [t0, *answered, t1] if window else []
    gap = max((b - a for a, b in zip(marks, marks[1:])), default=0.0)
    return {"sent": len(window), "lost": sum(1 for p in window if p[2] is None), "longest_gap": round(gap, 3)}


__all__ = ["COA", "CN", "HA", "HOA", "SPI_NAMES", "WALK", "Testbed", "TestbedError", "WirePacket",
           "esp_spi", "esp_summary", "ping_window", "wire_packets"]
