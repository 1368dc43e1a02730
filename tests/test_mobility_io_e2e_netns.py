"""The tunnel interface under two real engines on NFQUEUE, in three namespaces (root only).

::

    +--------------------+        +------------------------------+        +------------------------------+
    | mbt-cn             |  home  | mbt-ha (forwarding)          | visited| mbt-mn                       |
    | eth0 2001:db8:1::50| ------ | eth0 2001:db8:1::1/64        | ------ | eth0 2001:db8:f::100 (CoA)   |
    | dflt 2001:db8:1::1 |  link  | eth1 2001:db8:f::1/64        |  link  | default via 2001:db8:f::1    |
    |                    |        |      2001:db8:e::1/64        |        | then 2001:db8:e::100 (CoA 2) |
    +--------------------+        | engine (NFQUEUE 0/1)         |        | engine (NFQUEUE 0/1)         |
                                  | hook (NFQUEUE 7), mip6tnl,   |        | hook (NFQUEUE 7), mip6tnl,   |
                                  | BindingCache, MH socket      |        | HoA 2001:db8:1::100 on it    |
                                  +------------------------------+        +------------------------------+

The engines are ``bits.engine`` behind ``bits.io.nfqueue`` with their own iptables rules; the
mobility side is ``mobility.tunnel`` + ``mobility.io`` (the composition root's job, done here by a
small helper). One run per classification mode:

1. the MN sends a Binding Update (MH socket, HoA -> HA): its engine applies the BU transport SA,
   the TUN hands it to ``MnTunnel`` (CoA source + Home Address option), the HA's hook swaps the
   option, the HA's engine decrypts, the ``BindingCache`` accepts, the BA goes back through the
   HA's engine and ``HaTunnel`` (type 2 routing header, CoA destination), the MN's hook restores
   the HoA and its engine decrypts the BA;
2. the correspondent pings the HoA: proxy ND on the home link, the HA re-sends the forwarded packet
   to its engine (tunnel SA), ``HaTunnel`` sends it to the CoA, the MN answers through its engine
   and ``MnTunnel``;
3. the MN moves to a second CoA (a second prefix on the link) and registers again: the HA's data
   now leaves for the new CoA (Req #1) and the ping still works;
4. neither engine's SAD changed (apart from counters).
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
from tests.mipv6_sas import ENGINE, LOCAL, SAS, SPD, SPI_BA, SPI_BU, SPI_HA_DATA, SPI_MN_DATA

pytestmark = pytest.mark.netns

PREFIX = "mbt-"
CN_NS, HA_NS, MN_NS = f"{PREFIX}cn", f"{PREFIX}ha", f"{PREFIX}mn"
HOA, HA, CN = "2001:db8:1::100", "2001:db8:1::1", "2001:db8:1::50"
COA, COA2, HA_VISITED, HA_VISITED2 = "2001:db8:f::100", "2001:db8:e::100", "2001:db8:f::1", "2001:db8:e::1"
REPO = Path(__file__).resolve().parents[1]

if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("ip6tables") is None:
    pytest.skip("needs root, ip and ip6tables", allow_module_level=True)




MOBILITY = r'''
import ipaddress, json, os, select, signal, sys, time
from bits.constants import EncAlg
from mobility.binding import BindingCache, HomeAgentConfig
from mobility.constants import BuFlag
from mobility.mh import BindingAck, BindingUpdate
from mobility.options import AlternateCareOfAddress, find_option
from mobility.tunnel import BindingTable, HaTunnel, MnTunnel, esp_shape, make_classifier, tunnel_mtus
from mobility.io.classify import control_queries
from mobility.io.hook import HookRules, InboundHook
from mobility.io.mhsock import MhSocket, PacketSender
from mobility.io.routes import HaRoutes, MnRoutes, send_unsolicited_na
from mobility.io.tun import TunDevice, pump

role, mode, control = sys.argv[1:4]
HOA, HA, COA, HA_VISITED = "2001:db8:1::100", "2001:db8:1::1", "2001:db8:f::100", "2001:db8:f::1"
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))

def say(**kw):
    print(json.dumps(kw, default=str), flush=True)

plan = tunnel_mtus(1500, esp_shape(EncAlg.AES_GCM_16))
classifier = make_classifier(mode, role, *control_queries(control))
cleanup = []
try:
    tun = TunDevice("mip6tnl", mtu=plan.device_mtu)
    cleanup.append(tun.close)
    if role == "ha":
        routes = HaRoutes("mip6tnl", "eth0", announce=send_unsolicited_na)
        cleanup.append(routes.cleanup)
        routes.setup()
        table = BindingTable()
        tunnel = HaTunnel(HA, table.lookup, classifier, inner_mtu=plan.inner_mtu, tracing=True)
        cache = BindingCache(HomeAgentConfig(home_prefixes=("2001:db8:1::/64",)))
        mh = MhSocket(HA)
    else:
        routes = MnRoutes("mip6tnl")
        cleanup.append(routes.cleanup)
        routes.setup()
        routes.away(HOA, HA, "eth0", HA_VISITED, plan.inner_mtu)
        tunnel = MnTunnel(HOA, HA, classifier, tracing=True)
        mh = MhSocket(HOA)
    cleanup.append(mh.close)
    rules = HookRules(7)
    rules.install()  # after the engine's rules: ours come first
    cleanup.append(rules.remove)
    hook = InboundHook(tunnel, 7)
    hook.bind()
    cleanup.append(hook.close)
    sender = PacketSender()
    fds = [hook.fileno(), tun.fileno(), mh.fileno(), sys.stdin.fileno()]
    traces = []
    say(event="ready")
    while not stop:
        ready, _, _ = select.select(fds, [], [], 0.1)
        now = time.monotonic()
        if hook.fileno() in ready:
            hook.service()
        if tun.fileno() in ready:
            pump(tun, tunnel, sender.send, now)
        if mh.fileno() in ready:
            got = mh.recv()
            if role == "ha" and isinstance(got.message, BindingUpdate):
                ack, events = cache.handle_binding_update(got.message, hoa=got.src, src=got.src, now=now)
                table.apply(events)
                routes.apply(events)  # the HoA route before the BA: the BA goes through the tunnel
                alt = find_option(got.message.options, AlternateCareOfAddress)
                tunnel.expect_binding_ack(got.src, alt.coa if alt else got.src)
                mh.send(ack, got.src)
                say(event="bu", src=str(got.src), seq=got.message.seq, coa=str(alt.coa) if alt else None,
                    seen=str(ipaddress.IPv6Address(tunnel.seen_coa(got.src))) if tunnel.seen_coa(got.src) else None,
                    status=int(ack.status))
            elif role == "mn" and isinstance(got.message, BindingAck):
                if got.message.status < 128:
                    tunnel.binding_acknowledged(COA)
                say(event="ba", src=str(got.src), dst=str(got.dst), seq=got.message.seq, status=int(got.message.status))
        if sys.stdin.fileno() in ready:
            line = sys.stdin.readline().strip()
            if line.startswith("register "):
                _, coa, seq = line.split()
                COA = coa
                tunnel.expect_binding_update(COA)
                bu = BindingUpdate(int(seq), BuFlag.A | BuFlag.H, 15, (AlternateCareOfAddress(ipaddress.IPv6Address(COA)),))
                mh.send(bu, HA)
            elif not line:
                fds.remove(sys.stdin.fileno())
        traces += [t.to_dict() for t in tunnel.drain_events()]
    say(event="stats", tunnel=tunnel.status(), hook=hook.counts, sent={r.value: n for r, n in sender.sent.items()},
        send_errors=sender.errors, traces=traces[-200:])
finally:
    for fn in reversed(cleanup):
        try:
            fn()
        except Exception as exc:
            say(event="cleanup-error", error=str(exc))
'''


# --- plumbing ---------------------------------------------------------------------------------------------------


def ns(name: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    assert name.startswith(PREFIX)
    return subprocess.run(["ip", "netns", "exec", name, *argv], capture_output=True, text=True, check=check,
                          timeout=30)


def _delete_namespaces() -> None:
    for name in (CN_NS, HA_NS, MN_NS):
        if os.path.exists(f"/run/netns/{name}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def _veth(ns_a: str, dev_a: str, ns_b: str, dev_b: str) -> None:
    subprocess.run(["ip", "link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b],
                   check=True)


@pytest.fixture()
def topology() -> Iterator[None]:
    _delete_namespaces()
    try:
        for name in (CN_NS, HA_NS, MN_NS):
            subprocess.run(["ip", "netns", "add", name], check=True)
            ns(name, "ip", "link", "set", "lo", "up")
            for key in ("all", "default"):
                ns(name, "sysctl", "-qw", f"net.ipv6.conf.{key}.accept_dad=0")
                ns(name, "sysctl", "-qw", f"net.ipv6.conf.{key}.accept_ra=0")
        _veth(CN_NS, "eth0", HA_NS, "eth0")
        _veth(HA_NS, "eth1", MN_NS, "eth0")
        for name, dev, cidr in ((CN_NS, "eth0", f"{CN}/64"), (HA_NS, "eth0", f"{HA}/64"),
                                (HA_NS, "eth1", f"{HA_VISITED}/64"), (HA_NS, "eth1", f"{HA_VISITED2}/64"),
                                (MN_NS, "eth0", f"{COA}/64")):
            ns(name, "ip", "addr", "add", cidr, "dev", dev, "nodad")
            ns(name, "ip", "link", "set", dev, "up")
        ns(CN_NS, "ip", "-6", "route", "add", "default", "via", HA)
        ns(MN_NS, "ip", "-6", "route", "add", "default", "via", HA_VISITED)
        for name, devs in ((CN_NS, ["eth0"]), (HA_NS, ["eth0", "eth1"]), (MN_NS, ["eth0"])):
            wait_links_ready(name, devs)
        yield
    finally:
        _delete_namespaces()


def wait_links_ready(namespace: str, devs: list[str], timeout: float = 5.0) -> None:
    """Carrier comes through linkwatch (up to a second late); until then an interface has no
    link-local address routes and no multicast route."""
    deadline = time.monotonic() + timeout
    while True:
        routes = ns(namespace, "ip", "-6", "route", "show", "table", "local").stdout
        if all(f"ff00::/8 dev {dev} " in routes for dev in devs):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{namespace}: links not ready: {routes}")
        time.sleep(0.05)


class Proc:
    """A process in a namespace, stopped by its PID (SIGTERM, then SIGKILL)."""

    def __init__(self, namespace: str, argv: list[str], stdin: bool = False) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", namespace, *argv], cwd=REPO, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)
        self.events: list[dict] = []

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait_for(self, event: str, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events:
                if ev.get("event") == event:
                    self.events.remove(ev)
                    return ev
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise AssertionError(f"no {event!r} within {timeout} s; seen {self.events}")
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"process exited: {self.proc.stderr.read()[-3000:]}")
            if line.startswith("{"):
                self.events.append(json.loads(line))

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        self.events += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return err


def start_engine(tmp: Path, role: str, namespace: str) -> tuple[Proc, str]:
    sock = str(tmp / f"{role}.sock")
    (tmp / f"{role}.setkey").write_text(SAS + SPD[role])
    (tmp / f"{role}.toml").write_text(f"""
[node]
name = "{role}"
[ipsec]
state_dir = "{tmp}/{role}-state"
[queues]
outbound = 0
inbound = 1
[trace]
path = "{tmp}/{role}-trace.jsonl"
level = "drops"
[control]
socket = "{sock}"
""")
    script = tmp / "mbt_engine_helper.py"
    script.write_text(ENGINE)
    proc = Proc(namespace, [sys.executable, str(script), str(tmp / f"{role}.toml"), str(tmp / f"{role}.setkey"),
                            LOCAL[role]])
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"engine {role} did not start: {proc.stop()[-3000:]}")
        time.sleep(0.05)
    return proc, sock


def engine_sas(sock: str) -> list[tuple]:
    from bits.io.control import control_request

    return sorted((s["spi"], s["src"], s["dst"], s["mode"], s["direction"])
                  for s in control_request(sock, "status")["sas"])


@pytest.mark.parametrize("mode", ["api", "heuristic"])
def test_registration_and_payload_through_both_engines(topology, tmp_path, mode):
    os.chmod(tmp_path, 0o755)
    procs: list[Proc] = []
    try:
        ha_engine, ha_sock = start_engine(tmp_path, "ha", HA_NS)
        procs.append(ha_engine)
        mn_engine, mn_sock = start_engine(tmp_path, "mn", MN_NS)
        procs.append(mn_engine)
        sas_before = engine_sas(ha_sock), engine_sas(mn_sock)
        script = tmp_path / "mbt_mobility_helper.py"
        script.write_text(MOBILITY)
        ha = Proc(HA_NS, [sys.executable, str(script), "ha", mode, ha_sock])
        procs.append(ha)
        ha.wait_for("ready", 20)
        mn = Proc(MN_NS, [sys.executable, str(script), "mn", mode, mn_sock], stdin=True)
        procs.append(mn)
        mn.wait_for("ready", 20)

        for seq, coa in enumerate((COA, COA2), 1):  # register, then move to a second CoA
            if coa == COA2:
                ns(MN_NS, "ip", "addr", "add", f"{COA2}/64", "dev", "eth0", "nodad")
            mn.send(f"register {coa} {seq}")
            bu = ha.wait_for("bu")
            assert (bu["src"], bu["coa"], bu["seen"], bu["status"]) == (HOA, coa, coa, 0)
            ba = mn.wait_for("ba")
            assert (ba["src"], ba["dst"], ba["status"]) == (HA, HOA, 0)
            ping = ns(CN_NS, sys.executable, str(REPO / "tests" / "nstool.py"), "ping", HOA, "--count", "5",
                      "--timeout", "2", check=False)
            assert ping.returncode == 0, ping.stderr
        assert (engine_sas(ha_sock), engine_sas(mn_sock)) == sas_before  # SAs never touched by movement
    finally:
        errors = [p.stop() for p in reversed(procs)]
    ha_stats = next(e for e in ha.events if e["event"] == "stats")
    mn_stats = next(e for e in mn.events if e["event"] == "stats")
    assert not [e for p in procs for e in p.events if e.get("event") == "cleanup-error"], errors

    # the MN: one BU per CoA with the HAO, from that CoA; the echo replies as data from the CoA
    mn_counts = mn_stats["tunnel"]["counts"]
    assert mn_counts["out_signal"] == 2 and mn_counts["out_data"] >= 2 and mn_counts["in_rh2_removed"] == 2
    signal_traces = [t for t in mn_stats["traces"] if t["kind"] == "signal" and t["direction"] == "out"]
    assert [(t["coa"], t["spi"], t["mode"]) for t in signal_traces] == [(COA, "0x00001001", mode),
                                                                       (COA2, "0x00001001", mode)]
    data_sources = [t["coa"] for t in mn_stats["traces"] if t["kind"] == "data" and t["direction"] == "out"]
    assert data_sources[0] == COA and data_sources[-1] == COA2
    # the HA: each HAO swapped, each BA with RH2, forwarded pings re-sent to the engine, then to the CoA
    counts = ha_stats["tunnel"]["counts"]
    assert counts["in_hao"] == 2 and counts["out_signal"] == 2
    assert counts["out_reinjected"] >= 2 and counts["out_data"] >= 2
    outer = [t["coa"] for t in ha_stats["traces"] if t["direction"] == "out" and t["kind"] == "data"]
    assert outer[0] == COA and outer[-1] == COA2  # Req #1: after the new binding, the new CoA
    assert not mn_stats["send_errors"] and not ha_stats["send_errors"]
