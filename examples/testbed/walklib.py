"""Driving the testbed from Python: what scripts/demo-walk and tests/test_netns_handover.py share.

``Testbed`` wraps scripts/testbed (namespaces, moves, processes it spawns and stops by PID) and
starts mipbits on the HA and the MN with configurations rendered into its run directory (the
examples of this directory with their run-time paths moved there, so two testbeds with different
prefixes never share a socket). ``wire_packets`` reads a tcpdump capture (outer addresses and SPI
of every ESP packet -- also of the IPv6 ESP packets inside UDP 4191 and protocol 41, DSMIPv6),
``ping_window`` cuts traffic.py's ping report into the time of one move.
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
HOA4 = "198.18.1.100"  # the MN's IPv4 home address ([ha] ipv4_static)
HA4 = "198.51.100.2"  # the HA's IPv4 address (UDP 4191, protocol 41)
CN4 = "192.0.2.50"
NAT_WAN = "100.64.0.2"  # the NAT's public side: the outer source of the MN behind it
COA = {"v1": "2001:db8:a1::ff:fe00:a1", "v2": "2001:db8:a2::ff:fe00:a2",
       "v4nat": "192.168.1.100", "v4pub": "203.0.113.100"}
LINKS = {"home": "home link", "v1": "IPv6 visited", "v2": "IPv6 visited", "v4nat": "IPv4 behind a NAT",
         "v4pub": "IPv4 public"}
IPV6_WALK = ("v1", "v2", "v1", "home")  # Mobile IPv6 only
WALK = ("v1", "v4nat", "v4pub", "v1", "home")  # DSMIPv6: from home, back home
SPI_NAMES = {0x1001: "BU", 0x1002: "BA", 0x1007: "data", 0x1008: "data"}  # examples/testbed/*.setkey
DSMIPV6_PORT = 4191


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

    def render_configs(self, trace_level: str = "drops",
                       overrides: dict[str, dict[str, str]] | None = None) -> None:
        """The example configurations with their run-time files under our run directory.
        ``overrides``: node -> {key: TOML value} for its [mn] / [ha] section (the last one)."""
        out = self.run_dir / "config"
        out.mkdir(parents=True, exist_ok=True)
        for node in ("ha", "mn"):
            text = (HERE / f"{node}.toml").read_text().replace(EXAMPLE_RUN, str(self.run_dir))
            text = text.replace('level = "drops"', f'level = "{trace_level}"')
            for key, value in (overrides or {}).get(node, {}).items():
                text = _set_key(text, key, value)
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
        self.spawn(name, node, "tcpdump", "-n", "-U", "-Z", "root", "-i", iface, "-s", str(snaplen), "-w", str(path),
                   "ip6 or ip")
        self.wait_log(name, "listening on")
        return path

    def stop_all(self) -> None:
        for name in reversed(list(self.spawned)):
            with contextlib.suppress(TestbedError, subprocess.TimeoutExpired):
                self.stop(name)


def _set_key(text: str, key: str, value: str) -> str:
    """``key = value`` in the last section of a TOML text (replaced, or appended)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.split("=", 1)[0].strip() == key and "=" in line:
            lines[i] = f"{key} = {value}"
            return "\n".join(lines) + "\n"
    return text.rstrip("\n") + f"\n{key} = {value}\n"


# --- what the captures and the ping say ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WirePacket:
    """One packet of a capture: its outer addresses, the SPI of the ESP it carries (None: not
    ESP), the outer IPv6 Next Header / IPv4 protocol, and for DSMIPv6 (IPv4 outside) the
    encapsulation ("udp" with its ports, "ipip") of the IPv6 packet inside."""

    ts: float
    src: str
    dst: str
    spi: int | None  # None: not ESP
    proto: int  # the IPv6 Next Header of the fixed header (IPv4: the protocol)
    packet: bytes
    encap: str = ""  # "" (IPv6 on the wire), "udp" (UDP 4191), "ipip" (protocol 41), "ipv4" (other IPv4)
    sport: int = 0
    dport: int = 0

    def endpoint(self, which: str) -> str:
        """``src`` / ``dst`` with the UDP port for UDP-encapsulated packets (``100.64.0.2:41000``)."""
        addr, port = (self.src, self.sport) if which == "src" else (self.dst, self.dport)
        return f"{addr}:{port}" if self.encap == "udp" else addr


def wire_packets(pcap: Path) -> list[WirePacket]:
    """Every IP packet of a capture with its outer addresses and, for ESP (directly, or the IPv6
    packet inside UDP 4191 / protocol 41), its SPI."""
    out = []
    with open(pcap, "rb") as f, contextlib.suppress(ParseError):  # still being written: a record cut short
        for rec in read_pcap(f):
            pkt = rec.packet
            if len(pkt) >= 40 and pkt[0] >> 4 == 6:
                out.append(WirePacket(rec.ts, str(ipaddress.IPv6Address(pkt[8:24])),
                                      str(ipaddress.IPv6Address(pkt[24:40])), esp_spi(pkt), pkt[6], pkt))
            elif len(pkt) >= 20 and pkt[0] >> 4 == 4:
                out.append(_ipv4_packet(rec.ts, pkt))
    return out


def _ipv4_packet(ts: float, pkt: bytes) -> WirePacket:
    ihl, proto = (pkt[0] & 0x0F) * 4, pkt[9]
    src, dst = str(ipaddress.IPv4Address(pkt[12:16])), str(ipaddress.IPv4Address(pkt[16:20]))
    if proto == 17 and len(pkt) >= ihl + 8:
        sport, dport = int.from_bytes(pkt[ihl:ihl + 2], "big"), int.from_bytes(pkt[ihl + 2:ihl + 4], "big")
        if DSMIPV6_PORT in (sport, dport):
            inner = pkt[ihl + 8:]
            spi = esp_spi(inner) if len(inner) >= 40 and inner[0] >> 4 == 6 else None
            return WirePacket(ts, src, dst, spi, proto, pkt, "udp", sport, dport)
    if proto == 41:
        inner = pkt[ihl:]
        spi = esp_spi(inner) if len(inner) >= 40 and inner[0] >> 4 == 6 else None
        return WirePacket(ts, src, dst, spi, proto, pkt, "ipip")
    return WirePacket(ts, src, dst, None, proto, pkt, "ipv4")


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
    """ESP packets sent in [t0, t1) by (outer source, outer destination, what the SPI carries);
    in UDP 4191 the addresses carry the ports and ``what`` says "udp", in protocol 41 "ipip"."""
    return Counter((p.endpoint("src"), p.endpoint("dst"),
                    (f"{p.encap} " if p.encap else "") + SPI_NAMES.get(p.spi, f"spi {p.spi:#x}"))  # type: ignore[arg-type]
                   for p in packets if p.spi is not None and t0 <= p.ts < t1)


def ping_window(probes: Sequence[Sequence[Any]], t0: float, t1: float) -> dict[str, Any]:
    """Probes sent in [t0, t1): how many, how many unanswered, the longest time without an answered
    probe (the interruption a user would notice)."""
    window = [p for p in probes if t0 <= p[1] < t1]
    answered = [p[1] for p in window if p[2] is not None]
    marks = [t0, *answered, t1] if window else []
    gap = max((b - a for a, b in zip(marks, marks[1:])), default=0.0)
    return {"sent": len(window), "lost": sum(1 for p in window if p[2] is None), "longest_gap": round(gap, 3)}


__all__ = ["CN", "CN4", "COA", "HA", "HA4", "HOA", "HOA4", "IPV6_WALK", "LINKS", "NAT_WAN", "SPI_NAMES", "WALK",
           "Testbed", "TestbedError", "WirePacket", "esp_spi", "esp_summary", "ping_window", "wire_packets"]
