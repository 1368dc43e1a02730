"""Network namespace topologies for tests and benchmarks (root only).

``two_hosts(prefix)`` (namespace names are ``{prefix}{pid}-a`` etc.; shown as ``{prefix}a``)::

    +------------------+          veth           +------------------+
    | netns {prefix}a  | eth0 ------------- eth0 | netns {prefix}b  |
    | 10.66.1.1/24     |                         | 10.66.1.2/24     |
    | fd66:1::1/64     |                         | fd66:1::2/64     |
    +------------------+                         +------------------+

``a_r_b(prefix)`` (a router between, for captures "on the wire")::

    +-------------+       veth        +-------------------+       veth        +-------------+
    | {prefix}a   | eth0 ------- eth0 | {prefix}r         | eth1 ------- eth0 | {prefix}b   |
    | 10.66.1.1   |  10.66.1.0/24     | 10.66.1.254       |  10.66.2.0/24     | 10.66.2.1   |
    | fd66:1::1   |  fd66:1::/64      | fd66:1::fe        |  fd66:2::/64      | fd66:2::1   |
    |             |                   | 10.66.2.254       |                   |             |
    | default via r                   | fd66:2::fe        |                   default via r |
    +-------------+                   | forwarding on     |                   +-------------+
                                      +-------------------+

Every namespace gets ``lo`` up and IPv6 DAD disabled (``accept_dad=0`` plus ``nodad`` on each
address), so addresses are usable at once. ``Topology`` remembers what it made: ``close()`` stops
every process it started (by PID: SIGTERM, then SIGKILL) and deletes its namespaces; it runs from
``try/finally`` in the builders, from the pytest fixtures' finalizers and at interpreter exit, and
it is idempotent. Only namespaces named with the given prefix are ever touched; the names carry
the creating PID, so concurrent runs do not collide and a crashed run's namespaces are reaped by
the next one.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

DEFAULT_PREFIX = "mbp-"


def have_netns() -> bool:
    """Root, ``ip`` and ``iptables`` present: what the ``netns`` tests need."""
    return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("iptables") is not None


@dataclass
class Host:
    ns: str
    v4: str  # the host's main address (no prefix length)
    v6: str
    ifaces: dict[str, tuple[str, str]] = field(default_factory=dict)  # dev -> (v4/len, v6/len)


class Topology:
    """A set of namespaces, links, addresses and processes that ``close()`` removes again."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not prefix or "/" in prefix:
            raise ValueError(f"bad namespace prefix {prefix!r}")
        self.prefix = prefix
        # Names carry our PID, so two runs at once (a developer and CI, two sessions) never share
        # or delete each other's namespaces; those of dead runs are reaped here.
        self.tag = f"{os.getpid()}-"
        reap_stale_namespaces(prefix)
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.hosts: dict[str, Host] = {}
        self._closed = False
        atexit.register(self.close)

    # -- building --------------------------------------------------------------------------------

    def add_namespace(self, short: str, forwarding: bool = False) -> str:
        name = f"{self.prefix}{self.tag}{short}"
        _ip("netns", "add", name)
        self.namespaces.append(name)
        self.run(name, "ip", "link", "set", "lo", "up")
        for key in ("all", "default"):
            self.sysctl(name, f"net.ipv6.conf.{key}.accept_dad", "0")
        if forwarding:
            self.sysctl(name, "net.ipv4.ip_forward", "1")
            self.sysctl(name, "net.ipv6.conf.all.forwarding", "1")
        return name

    def sysctl(self, ns: str, key: str, value: str) -> None:
        self.run(ns, "sysctl", "-qw", f"{key}={value}")

    def link(self, ns_a: str, dev_a: str, ns_b: str, dev_b: str) -> None:
        """A veth pair created directly inside both namespaces (no name clash in the root ns)."""
        _ip("link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)
        for ns, dev in ((ns_a, dev_a), (ns_b, dev_b)):
            self.sysctl(ns, f"net.ipv6.conf.{dev}.accept_dad", "0")
            self.run(ns, "ip", "link", "set", dev, "up")

    def addr(self, ns: str, dev: str, cidr: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        extra = ["nodad"] if iface.version == 6 else []
        self.run(ns, "ip", "addr", "add", cidr, "dev", dev, *extra)

    def route(self, ns: str, dest: str, via: str) -> None:
        family = "-6" if ipaddress.ip_address(via).version == 6 else "-4"
        self.run(ns, "ip", family, "route", "add", dest, "via", via)

    # -- running ---------------------------------------------------------------------------------

    def run(self, ns: str, *argv: str, check: bool = True, timeout: float = 30,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside ``ns`` and wait for it; CalledProcessError names the command."""
        self._own(ns)
        done = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                              timeout=timeout, input=input)
        if check and done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)
        return done

    def spawn(self, ns: str, *argv: str, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
              env: dict[str, str] | None = None, cwd: str | None = None) -> subprocess.Popen:
        """Start a background process inside ``ns`` (``ip netns exec`` execs, so the PID is the
        program's own); ``close()`` stops it if the test did not."""
        self._own(ns)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=stdout, stderr=stderr,
                                env=env, cwd=cwd, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Signal one of our processes by PID and wait; SIGKILL after ``timeout``. Returns its code."""
        if proc not in self.procs:
            raise ValueError("not a process this topology started")
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        return proc.returncode

    def _own(self, ns: str) -> None:
        if ns not in self.namespaces:
            raise ValueError(f"{ns} is not a namespace of this topology")

    # -- cleanup ---------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            for proc in self.procs:
                with contextlib.suppress(Exception):
                    self.stop(proc, signal.SIGTERM, timeout=3)
        finally:
            for ns in reversed(self.namespaces):
                self._kill_leftovers(ns)
                subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
            self.namespaces.clear()
            atexit.unregister(self.close)

    @staticmethod
    def _kill_leftovers(ns: str) -> None:
        """Processes still inside our namespace (children of what we started) get SIGKILL."""
        done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
        for pid in done.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reap_stale_namespaces(prefix: str) -> list[str]:
    """Delete namespaces ``{prefix}{pid}-*`` whose creating process is gone (crashed runs)."""
    reaped = []
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return reaped
    for name in names:
        m = re.match(rf"{re.escape(prefix)}(\d+)-", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            Topology._kill_leftovers(name)
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
            reaped.append(name)
    return reaped


def _ip(*argv: str) -> None:
    done = subprocess.run(["ip", *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)


# -- ready-made topologies -----------------------------------------------------------------------


def two_hosts(prefix: str = DEFAULT_PREFIX, topo: Topology | None = None) -> Topology:
    """A and B on one veth link (see the module docstring)."""
    topo = topo or Topology(prefix)
    try:
        a, b = topo.add_namespace("a"), topo.add_namespace("b")
        topo.link(a, "eth0", b, "eth0")
        for ns, short, n in ((a, "a", 1), (b, "b", 2)):
            v4, v6 = f"10.66.1.{n}/24", f"fd66:1::{n}/64"
            topo.addr(ns, "eth0", v4)
            topo.addr(ns, "eth0", v6)
            topo.hosts[short] = Host(ns, v4.split("/")[0], v6.split("/")[0], {"eth0": (v4, v6)})
        return topo
    except BaseException:
        topo.close()
        raise


def a_r_b(prefix: str = DEFAULT_PREFIX, topo: Topology | None = None) -> Topology:
    """A - R - B with R forwarding (see the module docstring)."""
    topo = topo or Topology(prefix)
    try:
        a, r, b = topo.add_namespace("a"), topo.add_namespace("r", forwarding=True), topo.add_namespace("b")
        topo.link(a, "eth0", r, "eth0")
        topo.link(r, "eth1", b, "eth0")
        plan = (("a", a, "eth0", 1, 1), ("b", b, "eth0", 2, 1))
        for short, ns, dev, net, n in plan:
            v4, v6 = f"10.66.{net}.{n}/24", f"fd66:{net}::{n}/64"
            topo.addr(ns, dev, v4)
            topo.addr(ns, dev, v6)
            topo.route(ns, "default", f"10.66.{net}.254")
            topo.route(ns, "default", f"fd66:{net}::fe")
            topo.hosts[short] = Host(ns, v4.split("/")[0], v6.split("/")[0], {dev: (v4, v6)})
        r_ifaces = {}
        for dev, net in (("eth0", 1), ("eth1", 2)):
            v4, v6 = f"10.66.{net}.254/24", f"fd66:{net}::fe/64"
            topo.addr(r, dev, v4)
            topo.addr(r, dev, v6)
            r_ifaces[dev] = (v4, v6)
        topo.hosts["r"] = Host(r, "10.66.1.254", "fd66:1::fe", r_ifaces)
        return topo
    except BaseException:
        topo.close()
        raise


# -- pytest fixtures (import them into a test module to use them) --------------------------------


def _fixture_topology(request: pytest.FixtureRequest, build) -> Topology:  # type: ignore[no-untyped-def]
    if not have_netns():
        pytest.fail("netns tests need root, ip and iptables (deselect with -m 'not netns')")
    topo = Topology(getattr(request.module, "NETNS_PREFIX", DEFAULT_PREFIX))
    request.addfinalizer(topo.close)  # registered before anything exists: cleanup even on failure
    return build(topo.prefix, topo)


@pytest.fixture(scope="module")
def netns_two_hosts(request: pytest.FixtureRequest) -> Iterator[Topology]:
    topo = _fixture_topology(request, lambda p, t: two_hosts(p, t))
    try:
        yield topo
    finally:
        topo.close()


@pytest.fixture(scope="module")
def netns_a_r_b(request: pytest.FixtureRequest) -> Iterator[Topology]:
    topo = _fixture_topology(request, lambda p, t: a_r_b(p, t))
    try:
        yield topo
    finally:
        topo.close()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    """Poll ``predicate()`` until true; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception as exc:  # noqa: BLE001 - remembered for the message
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}" + (f" (last error: {last})" if last else ""))


NSTOOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nstool.py")
PYTHON = sys.executable


def nstool(topo: Topology, ns: str, *args: str, check: bool = False, timeout: float = 30):  # type: ignore[no-untyped-def]
    """Run ``tests/nstool.py`` (ping, udp-send, tcp-check, ...) inside ``ns``."""
    return topo.run(ns, PYTHON, NSTOOL, *args, check=check, timeout=timeout)


def spawn_nstool(topo: Topology, ns: str, *args: str) -> subprocess.Popen:
    """Start a listener (udp-listen, tcp-echo) in ``ns``; returns once it printed "ready"."""
    proc = topo.spawn(ns, PYTHON, NSTOOL, *args, stdout=subprocess.PIPE)
    line = proc.stdout.readline() if proc.stdout else b""
    if line.strip() != b"ready":
        raise RuntimeError(f"nstool {' '.join(args)} did not start in {ns}")
    return proc


def ping_ok(topo: Topology, ns: str, dst: str, count: int = 1, timeout_s: float = 2) -> bool:
    """ICMP / ICMPv6 echo from ``ns`` to ``dst`` answered."""
    done = nstool(topo, ns, "ping", dst, "--count", str(count), "--timeout", str(timeout_s))
    return done.returncode == 0
