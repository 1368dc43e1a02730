"""The mobility adapters against a real kernel, in two network namespaces (root only).

::

    +--------------------------------------+   veth    +--------------------------------+
    | mbt-mn                               |           | mbt-ha                         |
    |  eth0 2001:db8:f::100/64  (the CoA)  | eth0-eth0 |  eth0 2001:db8:f::1/64         |
    |  mip6tnl (TUN)  HoA 2001:db8:1::100  |           |  lo   2001:db8:1::1/128  (HA)  |
    |  main:  HA/128 dev mip6tnl           |           |  2001:db8:1::/64 via f::100    |
    |         default dev mip6tnl mtu 1402 |           |                                |
    |  fwmark 0x100000 -> table 201:       |           |                                |
    |         default via 2001:db8:f::1    |           |                                |
    +--------------------------------------+           +--------------------------------+

What is proved, with the real TUN device, raw sockets, NFQUEUE, ip6tables and policy routing:

1. an ESP packet HoA -> HA sent on the MN is routed into the TUN, the tunnel module rewrites its
   source to the CoA, and the SO_MARK'ed raw socket sends it out of eth0 (not back into the TUN);
   the HA receives it from the CoA with the ESP bytes unchanged;
2. ESP from the HA to the CoA with a type 2 routing header is rewritten by the MN's NFQUEUE hook
   before the kernel sees it: a socket on the MN receives it addressed to the HoA (without the hook
   the kernel discards it as a header error: routing type 2 unknown);
3. a packet with a Home Address option is discarded by this kernel; with the HA's hook it reaches
   a UDP socket with the HoA as its source (RFC 6275 9.3.1);
4. rtnetlink reports an address added to an interface in the namespace; MhSocket sends and
   receives a Mobility Header with the right checksum.

Namespaces are named ``mbt-*``; they and the helper processes (killed by PID) go in ``finally``.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

PREFIX = "mbt-"
MN_NS, HA_NS = f"{PREFIX}mn", f"{PREFIX}ha"
HOA, HA, COA, HA_LINK = "2001:db8:1::100", "2001:db8:1::1", "2001:db8:f::100", "2001:db8:f::1"
REPO = Path(__file__).resolve().parents[1]

if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("ip6tables") is None:
    pytest.skip("needs root, ip and ip6tables", allow_module_level=True)


HELPER = r'''
import ipaddress, json, os, select, signal, socket, sys, time
from mobility.tunnel import BindingTable, HaTunnel, HeuristicClassifier, MnTunnel
from mobility.io.hook import HookRules, InboundHook
from mobility.io.mhsock import PacketSender
from mobility.io.routes import HaRoutes, MnRoutes
from mobility.io.tun import TunDevice, pump

role = sys.argv[1]
HOA, HA, COA, HA_LINK = "2001:db8:1::100", "2001:db8:1::1", "2001:db8:f::100", "2001:db8:f::1"
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))

def say(**kw):
    print(json.dumps(kw), flush=True)

def pktinfo_socket(proto, port=None):
    if proto == "udp":
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.bind(("::", port))
    else:
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, 50)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    s.setblocking(False)
    return s

def drain(s, kind):
    while True:
        try:
            data, anc, _f, addr = s.recvmsg(65535, socket.CMSG_SPACE(20))
        except BlockingIOError:
            return
        dst = next((str(ipaddress.IPv6Address(d[:16])) for l, t, d in anc if t == socket.IPV6_PKTINFO), None)
        say(event=kind, src=addr[0], dst=dst, data=data.hex())

cleanup = []
try:
    if role == "mn":
        routes = MnRoutes("mip6tnl")
        cleanup.append(routes.cleanup)
        routes.setup()
        tun = TunDevice("mip6tnl", mtu=1476)
        cleanup.append(tun.close)
        routes.away(HOA, HA, "eth0", HA_LINK, 1402)
        tunnel = MnTunnel(HOA, HA, HeuristicClassifier())
        tunnel.expect_binding_update(COA)
        tunnel.binding_acknowledged(COA)
        listen = pktinfo_socket("esp")
    else:
        table = BindingTable()
        tunnel = HaTunnel(HA, table.lookup, HeuristicClassifier())
        tun = None
        listen = pktinfo_socket("udp", 5555)
    rules = HookRules(7)
    rules.install()
    cleanup.append(rules.remove)
    hook = InboundHook(tunnel, 7)
    hook.bind()
    cleanup.append(hook.close)
    sender = PacketSender()
    fds = [hook.fileno(), listen.fileno()] + ([tun.fileno()] if tun else [])
    say(event="ready")
    while not stop:
        ready, _, _ = select.select(fds, [], [], 0.1)
        if hook.fileno() in ready:
            hook.service()
        if tun and tun.fileno() in ready:
            pump(tun, tunnel, sender.send, time.monotonic())
        if listen.fileno() in ready:
            drain(listen, "received")
    say(event="stats", tunnel=tunnel.status(), hook=hook.counts, sent={r.value: n for r, n in sender.sent.items()},
        send_errors=sender.errors)
finally:
    for fn in reversed(cleanup):
        try:
            fn()
        except Exception as exc:
            print(json.dumps({"event": "cleanup-error", "error": str(exc)}), flush=True)
'''


# --- namespace plumbing ----------------------------------------------------------------------------------------


def ns(name: str, *argv: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    assert name.startswith(PREFIX)
    return subprocess.run(["ip", "netns", "exec", name, *argv], capture_output=True, text=True,
                          check=check, timeout=30, input=stdin)


def _delete_namespaces() -> None:
    for name in (MN_NS, HA_NS):
        if os.path.exists(f"/run/netns/{name}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@pytest.fixture(scope="module")
def topology() -> Iterator[None]:
    _delete_namespaces()
    try:
        for name in (MN_NS, HA_NS):
            subprocess.run(["ip", "netns", "add", name], check=True)
            ns(name, "ip", "link", "set", "lo", "up")
            for key in ("all", "default"):
                ns(name, "sysctl", "-qw", f"net.ipv6.conf.{key}.accept_dad=0")
        subprocess.run(["ip", "link", "add", "eth0", "netns", MN_NS, "type", "veth", "peer", "name", "eth0",
                        "netns", HA_NS], check=True)
        ns(MN_NS, "ip", "addr", "add", f"{COA}/64", "dev", "eth0", "nodad")
        ns(HA_NS, "ip", "addr", "add", f"{HA_LINK}/64", "dev", "eth0", "nodad")
        ns(HA_NS, "ip", "addr", "add", f"{HA}/128", "dev", "lo")
        for name in (MN_NS, HA_NS):
            ns(name, "ip", "link", "set", "eth0", "up")
        ns(HA_NS, "ip", "-6", "route", "add", "2001:db8:1::/64", "via", COA)
        yield
    finally:
        _delete_namespaces()


class Helper:
    """The helper script in a namespace; stopped by PID (SIGTERM, then SIGKILL)."""

    def __init__(self, namespace: str, role: str, script: Path) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, str(script), role],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )
        self.events: list[dict] = []
        assert self.wait_for("ready", 15)["event"] == "ready"

    def wait_for(self, event: str, timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events:
                if ev["event"] == event:
                    self.events.remove(ev)
                    return ev
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"helper exited: {self.proc.stderr.read()}")
            self.events.append(json.loads(line))
        raise AssertionError(f"no {event!r} within {timeout} s; seen {self.events}")

    def stop(self) -> dict:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        self.events += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        errors = [e for e in self.events if e["event"] == "cleanup-error"]
        assert not errors, errors
        return next((e for e in self.events if e["event"] == "stats"), {"stderr": err})


@pytest.fixture()
def helper_script(tmp_path: Path) -> Path:
    path = tmp_path / "mbt_helper.py"
    path.write_text(HELPER)
    return path


def send_raw(namespace: str, packet: bytes, mark: int = 0) -> None:
    code = (
        "import socket,sys; s=socket.socket(socket.AF_INET6,socket.SOCK_RAW,socket.IPPROTO_RAW);"
        f"m={mark};\nif m: s.setsockopt(socket.SOL_SOCKET,36,m)\n"
        "p=bytes.fromhex(sys.argv[1]); s.sendto(p,(socket.inet_ntop(socket.AF_INET6,p[24:40]),0))"
    )
    ns(namespace, sys.executable, "-c", code, packet.hex())


def nstat(namespace: str, counter: str) -> int:
    out = ns(namespace, "nstat", "-az", counter).stdout
    return next((int(line.split()[1]) for line in out.splitlines() if line.startswith(counter)), 0)


def wait_until(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def fake_esp(spi: int, seq: int) -> bytes:
    return spi.to_bytes(4, "big") + seq.to_bytes(4, "big") + bytes(range(48))


# --- the tests -------------------------------------------------------------------------------------------------


def test_tun_mark_and_policy_routing_carry_mn_esp_out_from_the_coa(topology, helper_script):
    from scapy.layers.inet6 import IPv6

    listen = (
        "import socket; s=socket.socket(socket.AF_INET6,socket.SOCK_RAW,50); s.settimeout(5);"
        "print('ready', flush=True); d,a=s.recvfrom(65535); print(a[0], d.hex(), flush=True)"
    )
    ha_listener = subprocess.Popen(["ip", "netns", "exec", HA_NS, sys.executable, "-c", listen],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mn = Helper(MN_NS, "mn", helper_script)
    try:
        assert ha_listener.stdout.readline().strip() == "ready"
        esp = fake_esp(0x1007, 1)
        send_raw(MN_NS, bytes(IPv6(src=HOA, dst=HA, nh=50) / esp))  # unmarked: routed into the TUN
        out, _ = ha_listener.communicate(timeout=10)
        src, data = out.split()
        assert src == COA and bytes.fromhex(data) == esp
    finally:
        if ha_listener.poll() is None:
            ha_listener.kill()
            ha_listener.communicate()
        stats = mn.stop()
    assert stats["tunnel"]["counts"]["out_data"] == 1
    assert stats["sent"]["wire"] == 1 and not stats["send_errors"]
    rules = ns(MN_NS, "ip", "-6", "rule", "show").stdout
    assert "0x100000" not in rules  # cleaned up
    assert "mip6tnl" not in ns(MN_NS, "ip", "link").stdout


def test_mn_hook_rewrites_esp_with_routing_header_before_the_kernel(topology, helper_script):
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrRouting

    esp = fake_esp(0x1002, 1)
    packet = bytes(IPv6(src=HA, dst=COA) / IPv6ExtHdrRouting(type=2, segleft=1, addresses=[HOA], nh=50) / esp)
    before = nstat(MN_NS, "Ip6InHdrErrors")
    send_raw(HA_NS, packet)  # no hook yet: the kernel rejects routing type 2
    assert wait_until(lambda: nstat(MN_NS, "Ip6InHdrErrors") == before + 1)

    mn = Helper(MN_NS, "mn", helper_script)
    try:
        send_raw(HA_NS, packet)
        got = mn.wait_for("received")
    finally:
        stats = mn.stop()
    assert (got["src"], got["dst"]) == (HA, HOA) and bytes.fromhex(got["data"]) == esp
    assert stats["hook"]["rewritten"] == 1 and stats["tunnel"]["counts"]["in_rh2_removed"] == 1
    assert nstat(MN_NS, "Ip6InHdrErrors") == before + 1
    assert "MIPBITS-MIP" not in ns(MN_NS, "ip6tables-save").stdout  # rules removed


def test_ha_hook_swaps_the_home_address_option_so_the_kernel_delivers(topology, helper_script):
    from scapy.layers.inet import UDP
    from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt

    packet = bytes(IPv6(src=COA, dst=HA) / IPv6ExtHdrDestOpt(options=[HAO(hoa=HOA)]) / UDP(sport=7, dport=5555)
                   / b"hello")
    ns(MN_NS, "ip", "-6", "route", "replace", f"{HA}/128", "via", HA_LINK)
    try:
        before = nstat(HA_NS, "Ip6InHdrErrors")
        send_raw(MN_NS, packet)
        assert wait_until(lambda: nstat(HA_NS, "Ip6InHdrErrors") == before + 1), ns(HA_NS, "nstat", "-a").stdout

        ha = Helper(HA_NS, "ha", helper_script)
        try:
            send_raw(MN_NS, packet)
            got = ha.wait_for("received")
        except AssertionError:
            raise AssertionError(ha.stop()) from None
        finally:
            stats = ha.stop()
    finally:
        ns(MN_NS, "ip", "-6", "route", "del", f"{HA}/128", "via", HA_LINK, check=False)
    assert nstat(HA_NS, "Ip6InHdrErrors") == before + 1
    assert (got["src"], got["dst"], bytes.fromhex(got["data"])) == (HOA, HA, b"hello")
    assert stats["hook"]["rewritten"] == 1 and stats["tunnel"]["counts"]["in_hao"] == 1
    assert stats["tunnel"]["reasons"] == {"no-binding": 1}


def test_netlink_reports_an_address_added_in_the_namespace(topology):
    code = (
        "import json,select,sys\n"
        "from mobility.io.netlink import NetlinkMonitor, AddressEvent, LinkEvent\n"
        "m=NetlinkMonitor(); print('ready',flush=True); evs=[]\n"
        "while not any(isinstance(e,AddressEvent) for e in evs) and select.select([m],[],[],5)[0]:\n"
        "    evs+=[e for e in m.read() if isinstance(e,AddressEvent) and not e.address.is_link_local"
        " or isinstance(e,LinkEvent) and e.name=='mbt0']\n"
        "print(json.dumps([[type(e).__name__, str(getattr(e,'address','')), getattr(e,'up',None)] for e in evs]))\n"
    )
    proc = subprocess.Popen(["ip", "netns", "exec", MN_NS, sys.executable, "-c", code],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "ready"
        ns(MN_NS, "ip", "link", "add", "mbt0", "type", "veth", "peer", "name", "mbt1")
        ns(MN_NS, "ip", "link", "set", "mbt1", "up")
        ns(MN_NS, "ip", "link", "set", "mbt0", "up")
        ns(MN_NS, "ip", "addr", "add", "2001:db8:e::100/64", "dev", "mbt0", "nodad")
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        ns(MN_NS, "ip", "link", "del", "mbt0", check=False)
    events = json.loads(out.strip().splitlines()[-1])
    assert ["AddressEvent", "2001:db8:e::100", None] in events
    assert any(e[0] == "LinkEvent" for e in events), (events, err)


def test_mh_socket_checksum_and_destination(topology):
    code = (
        "import ipaddress, time\n"
        "from mobility.io.mhsock import MhSocket\n"
        "from mobility.mh import BindingRefreshRequest\n"
        "a=MhSocket('2001:db8:f::100'); b=MhSocket('2001:db8:f::100')\n"
        "a.send(BindingRefreshRequest(), '2001:db8:f::100')\n"
        "time.sleep(0.2); r=b.recv()\n"
        "print(r.src, r.dst, type(r.message).__name__)\n"
    )
    out = ns(MN_NS, sys.executable, "-c", code).stdout.split()
    assert out == [COA, COA, "BindingRefreshRequest"]
