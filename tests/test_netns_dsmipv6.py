"""DSMIPv6 in network namespaces: an MN in IPv4-only networks, behind a NAT and without one, with
real engines on NFQUEUE, the tunnel module, TUN devices and UDP 4191 / protocol 41 sockets (root).

::

    +--------------------+  home   +--------------------------------+   wan 203.0.113.0/24  +---------------------+
    | {p}cn              |  link   | {p}ha (IPv6 forwarding)        |-----------------------| {p}nat              |
    | eth0 2001:db8:1::50|---------| eth0 2001:db8:1::1/64          | eth1       eth0       | eth0 203.0.113.2    |
    | dflt 2001:db8:1::1 |         | eth1 203.0.113.1/24  (HA4)     | 203.0.113.1           | MASQUERADE (udp)    |
    +--------------------+         | eth2 198.51.100.1/24           |                       | eth1 192.168.1.1/24 |
                                   | engine (NFQUEUE 0/1), hook (7) |                       +----------+----------+
                                   | mip6tnl, MH socket, UDP 4191,  |                                  | priv
                                   | protocol 41, BindingCache      |                                  | 192.168.1.0/24
                                   +---------------+----------------+                                  |
                                                   | pub 198.51.100.0/24 (no NAT)                      |
                                   +---------------+----------------------------------------------------+---------+
                                   | {p}mn  eth1 198.51.100.100/24        eth0 192.168.1.100/24 (behind the NAT)    |
                                   | no global IPv6 on eth0/eth1: IPv4-only visited networks, both up at once;      |
                                   | ip rule from 192.168.1.100 -> table 101 (via 192.168.1.1),                     |
                                   | ip rule from 198.51.100.100 -> table 102 (via 198.51.100.1);                   |
                                   | HoA 2001:db8:1::100 on mip6tnl; engine, hook, BindingUpdateList, UDP :40000    |
                                   +--------------------------------------------------------------------------------+

({p} = ``mbd-<pid>-``.) The MN and the HA are composed here from the cores and adapters
(``MnTunnel``/``HaTunnel``, ``BindingUpdateList``/``BindingCache``, ``mobility.io``), the way
the runtime is told to in docs/dsmipv6.md. Each test runs in ``api`` mode (queries over the
engine's control socket) and in ``heuristic`` mode (the mobility processes get a control socket
path that does not exist).

1. ``test_nat_walk``: register behind the NAT (NAT detected, BA and data via the NAT's address and
   port), garbage on UDP 4191 from the NAT's address changes nothing, then move to the public
   network with a UDP data flood running and a slow BA: the BU leaves via the new CoA, no data
   packet does before the BA (checked on the wire), then data goes IPv6-in-IPv4 (no NAT).
2. ``test_keepalives_and_new_mapping``: with a short NATKATIMEOUT the keepalive BUs keep the NAT
   mapping through idle time; without them it dies; after a conntrack flush (new port range) the
   HA follows the new port after the next authenticated BU, not before.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bits.io.control import control_request
from bits.io.pcap import read_pcap
from tests.netns import Topology, have_netns, nstool, wait_until
from tests.mipv6_sas import ENGINE, LOCAL, SAS, SPD, SPI_BA, SPI_BU, SPI_HA_DATA, SPI_MN_DATA

pytestmark = pytest.mark.netns

NETNS_PREFIX = "mbd-"
HOA, HA, CN = "2001:db8:1::100", "2001:db8:1::1", "2001:db8:1::50"
HA4, HA_PUB = "203.0.113.1", "198.51.100.1"
NAT_WAN, NAT_PRIV = "203.0.113.2", "192.168.1.1"
PRIV, PUB = "192.168.1.100", "198.51.100.100"
MN_PORT = 40000
REPO = Path(__file__).resolve().parents[1]




# The MN or the HA, composed from the cores and the adapters (what the runtime does; see
# docs/dsmipv6.md "What the runtime calls"). Commands on stdin, JSON events on stdout.
MOBILITY = r'''
import ipaddress, json, os, select, signal, sys, time
from bits.constants import EncAlg
from mobility.binding import BindingCache, HomeAgentConfig
from mobility.bul import BindingUpdateList, MobileNodeConfig, Registered
from mobility.mh import BindingAck, BindingUpdate
from mobility.options import AlternateCareOfAddress, find_option
from mobility.tunnel import BindingTable, HaTunnel, MnTunnel, esp_shape, make_classifier, tunnel_mtus
from mobility.udp4191 import DSMIPV6_PORT, DSMIPV6_RESERVE
from mobility.io.classify import control_queries
from mobility.io.hook import HookRules, InboundHook
from mobility.io.mhsock import MhSocket, PacketSender
from mobility.io.routes import HaRoutes, MnRoutes, send_unsolicited_na
from mobility.io.tun import TunDevice, pump
from mobility.io.udp4191 import (Counters, IpipSocket, RouteSender, UdpTunnelSocket, control_inbound_seq,
                                 service_ipip, service_udp)

role, mode, control, natka = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
HOA, HA, HA4, MN_PORT = "2001:db8:1::100", "2001:db8:1::1", "203.0.113.1", 40000
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
log = []

def say(**kw):
    print(json.dumps(kw, default=str), flush=True)

def entry_dict(e):
    if e is None:
        return None
    return {"coa": str(e.coa), "udp_source": endpoint(e.udp_source), "nat": e.nat_detected,
            "udp_encap": e.udp_encap, "seq": e.seq}

def endpoint(ep):
    return None if ep is None else [str(ep.address), ep.port]

plan = tunnel_mtus(1500, esp_shape(EncAlg.AES_GCM_16), reserve=DSMIPV6_RESERVE)
queries = control_queries(control)  # heuristic mode: a path that does not exist, and never asked
classifier = make_classifier(mode, role, *queries)
cleanup = []
try:
    tun = TunDevice("mip6tnl", mtu=plan.device_mtu)
    cleanup.append(tun.close)
    wire = PacketSender()
    cleanup.append(wire.close)
    if role == "ha":
        routes = HaRoutes("mip6tnl", "eth0", announce=send_unsolicited_na)
        cleanup.append(routes.cleanup)
        routes.setup()
        table = BindingTable()
        inbound_seq = control_inbound_seq(control) if mode == "api" else None
        tunnel = HaTunnel(HA, table, classifier, inner_mtu=plan.inner_mtu, tracing=True, inbound_seq=inbound_seq)
        cache = BindingCache(HomeAgentConfig(home_prefixes=("2001:db8:1::/64",), nat_refresh_time=int(natka)))
        mh = MhSocket(HA)
        udp = UdpTunnelSocket(HA4, DSMIPV6_PORT)
    else:
        routes = MnRoutes("mip6tnl")
        cleanup.append(routes.cleanup)
        routes.setup()
        routes.away(HOA, HA, "eth0", None, plan.inner_mtu)
        tunnel = MnTunnel(HOA, HA, classifier, ha_ipv4=HA4, tracing=True)
        bul = BindingUpdateList(MobileNodeConfig(hoa=ipaddress.IPv6Address(HOA), ha=ipaddress.IPv6Address(HA),
                                                 ha_ipv4=ipaddress.IPv4Address(HA4), lifetime=600.0,
                                                 nat_keepalive=natka), rand=os.urandom)
        mh = MhSocket(HOA)
        udp = UdpTunnelSocket("0.0.0.0", MN_PORT)
    cleanup += [mh.close, udp.close]
    ipip = IpipSocket(HA4 if role == "ha" else None)
    cleanup.append(ipip.close)
    sender = RouteSender(wire.send, udp, ipip)
    rules = HookRules(7)
    rules.install()  # after the engine's rules: ours come first
    cleanup.append(rules.remove)
    hook = InboundHook(tunnel, 7)
    hook.bind()
    cleanup.append(hook.close)
    counters = Counters()
    fds = [hook.fileno(), tun.fileno(), mh.fileno(), udp.fileno(), ipip.fileno(), sys.stdin.fileno()]
    ba_delay, delayed, paused, last_bu = 0.0, [], False, None

    def drain():
        log.extend(t.to_dict() for t in tunnel.drain_events())

    def send_bus(messages):
        for out in messages:
            tunnel.expect_binding_update(out.src)
            mh.send(out.bu, HA)
            say(event="bu-sent", src=str(out.src), seq=out.bu.seq)

    say(event="ready")
    while not stop:
        now = time.monotonic()
        timeout = 0.05
        ready, _, _ = select.select(fds, [], [], timeout)
        now = time.monotonic()
        if hook.fileno() in ready:
            hook.service()
        if tun.fileno() in ready:
            pump(tun, tunnel, sender.send, now)
        if udp.fileno() in ready:
            if role == "ha":
                for _ in range(256):
                    got = udp.recv()
                    if got is None:
                        break
                    payload, (src, sport) = got
                    if payload[40:44] == (0x1001).to_bytes(4, "big"):
                        last_bu = payload.hex()
                    out = tunnel.inbound_udp(payload, src, sport, now)
                    if isinstance(out, bytes):
                        tun.write(out)
            else:
                service_udp(udp, tunnel, tun.write, now, counters)
        if ipip.fileno() in ready:
            service_ipip(ipip, tunnel, tun.write, now, counters)
        if mh.fileno() in ready:
            try:
                got = mh.recv()
            except Exception as exc:
                say(event="mh-error", error=str(exc))
                got = None
            if got is not None and role == "ha" and isinstance(got.message, BindingUpdate):
                bu = got.message
                udp_source = tunnel.bu_udp_source(got.src, bu, now)
                ack, events = cache.handle_binding_update(bu, hoa=got.src, src=got.src, now=now, udp_source=udp_source)
                table.apply(events)
                routes.apply(events)  # the HoA route before the BA: the BA goes through the tunnel
                alt = find_option(bu.options, AlternateCareOfAddress)
                say(event="bu", seq=bu.seq, udp_source=endpoint(udp_source),
                    entry=entry_dict(cache.lookup(got.src)), status=None if ack is None else int(ack.status),
                    events=[type(e).__name__ for e in events])
                if ack is not None:
                    delayed.append((now + ba_delay, got.src, udp_source if udp_source is not None else alt.coa, ack))
            elif got is not None and role == "mn" and isinstance(got.message, BindingAck):
                drain()
                result = bul.handle_binding_ack(got.message, now)
                for ev in result.events:
                    if isinstance(ev, Registered):
                        tunnel.binding_acknowledged(ev.coa, udp_encap=ev.udp_encap)
                        log.append({"event": "ba-accepted", "coa": str(ev.coa)})
                        say(event="registered", coa=str(ev.coa), udp_encap=ev.udp_encap, nat=ev.nat_detected)
                say(event="ba", seq=got.message.seq, status=int(got.message.status))
                send_bus(result.messages)
        if role == "ha":
            for item in [d for d in delayed if d[0] <= now]:
                delayed.remove(item)
                _, hoa, dest, ack = item
                tunnel.expect_binding_ack(hoa, dest)
                mh.send(ack, hoa)
            if cache.next_timer() is not None and cache.next_timer() <= now:
                events = cache.handle_timer(now)
                table.apply(events)
                routes.apply(events)
        elif not paused and bul.next_timer() is not None and bul.next_timer() <= now:
            send_bus(bul.handle_timer(now).messages)
        if sys.stdin.fileno() in ready:
            line = sys.stdin.readline().strip()
            if not line:
                fds.remove(sys.stdin.fileno())
            elif line.startswith("move "):
                send_bus(bul.movement(ipaddress.IPv4Address(line.split()[1]), now).messages)
            elif line.startswith("delay-ba "):
                ba_delay = float(line.split()[1])
            elif line == "pause":
                paused = True
            elif line == "resume":
                paused = False
            elif line == "status":
                st = {"event": "status", "tunnel": tunnel.status(), "sender": sender.sent, "send_errors": sender.errors,
                      "hook": hook.counts, "udp_in": counters.counts}
                if role == "ha":
                    st.update(entry=entry_dict(cache.lookup(HOA)), last_bu=last_bu)
                else:
                    st.update(state=bul.state.name)
                say(**st)
        drain()
    say(event="stats", tunnel=tunnel.status(), log=log[-3000:], send_errors=sender.errors, sent=sender.sent,
        queries=getattr(classifier, "queries", None))
finally:
    for fn in reversed(cleanup):
        try:
            fn()
        except Exception as exc:
            say(event="cleanup-error", error=str(exc))
'''

FLOOD = r'''
import socket, sys, time
dst, rate, duration = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
n, start = 0, time.monotonic()
while time.monotonic() - start < duration:
    try:
        s.sendto(b"flood" * 12, (dst, 9999))
    except OSError:
        pass
    n += 1
    delay = start + n / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
print(n, flush=True)
'''

GARBAGE = r'''
import os, socket, sys
ha4, captured = sys.argv[1], bytes.fromhex(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 5555))
unknown = bytearray(captured); unknown[40:44] = (0xDEAD).to_bytes(4, "big")
forged = bytearray(captured)
forged[44:48] = (int.from_bytes(captured[44:48], "big") + 1000).to_bytes(4, "big")  # ahead of the window
forged[-1] ^= 1  # and the ICV broken
for payload in (b"\x00" + os.urandom(79), captured[:45], b"\xff", bytes(unknown), captured, bytes(forged)):  # random, not IP
    s.sendto(payload, (ha4, 4191))
print("sent", flush=True)
'''


class Proc:
    """A process in one of our namespaces (registered with the topology: stopped by PID)."""

    def __init__(self, topo: Topology, namespace: str, argv: list[str], stdin: bool = False) -> None:
        topo._own(namespace)
        self.proc = subprocess.Popen(["ip", "netns", "exec", namespace, *argv], cwd=REPO, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                     stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)
        topo.procs.append(self.proc)
        self.topo = topo
        self.events: list[dict] = []
        self._buf = b""
        self._lines = 0  # ``_n`` of an event: its line number on stdout (arrival order)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait_for(self, event: str, timeout: float = 10.0, **match: object) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events:
                if ev.get("event") == event and all(ev.get(k) == v for k, v in match.items()):
                    self.events.remove(ev)
                    return ev
            left = deadline - time.monotonic()
            fd = self.proc.stdout.fileno()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"no {event!r} {match} within {timeout} s; seen {self.events[-20:]}")
            chunk = os.read(fd, 1 << 20)  # raw reads: a buffered readline would hide lines from select
            if not chunk:
                raise AssertionError(f"process exited: {self.proc.stderr.read()[-3000:]}")
            self._buf += chunk
            *lines, self._buf = self._buf.split(b"\n")
            for line in lines:
                if line.startswith(b"{"):
                    self._lines += 1
                    self.events.append(dict(json.loads(line), _n=self._lines))

    def status(self) -> dict:
        self.send("status")
        return self.wait_for("status")

    def stop(self) -> str:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            out, err = self.proc.communicate()
        text = self._buf.decode() + out
        self._buf = b""
        self.events += [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        return err


@pytest.fixture(scope="module")
def topo(request: pytest.FixtureRequest) -> Iterator[Topology]:
    if not have_netns():
        pytest.fail("netns tests need root, ip and iptables (deselect with -m 'not netns')")
    t = Topology(NETNS_PREFIX)
    request.addfinalizer(t.close)  # cleanup even when building fails
    cn, ha, nat, mn = (t.add_namespace("cn"), t.add_namespace("ha"), t.add_namespace("nat", forwarding=True),
                       t.add_namespace("mn"))
    t.hosts.update(cn=cn, ha=ha, nat=nat, mn=mn)  # type: ignore[dict-item]
    for name in (cn, ha, nat, mn):
        t.sysctl(name, "net.ipv4.conf.all.rp_filter", "0")
        t.sysctl(name, "net.ipv4.conf.default.rp_filter", "0")
        t.sysctl(name, "net.ipv6.conf.all.accept_ra", "0")
    t.link(cn, "eth0", ha, "eth0")
    t.link(ha, "eth1", nat, "eth0")
    t.link(ha, "eth2", mn, "eth1")
    t.link(nat, "eth1", mn, "eth0")
    for ns_, dev, cidr in ((cn, "eth0", f"{CN}/64"), (ha, "eth0", f"{HA}/64"), (ha, "eth1", f"{HA4}/24"),
                           (ha, "eth2", f"{HA_PUB}/24"), (nat, "eth0", f"{NAT_WAN}/24"),
                           (nat, "eth1", f"{NAT_PRIV}/24"), (mn, "eth0", f"{PRIV}/24"), (mn, "eth1", f"{PUB}/24")):
        t.addr(ns_, dev, cidr)
    t.route(cn, "default", HA)
    t.route(nat, "default", HA4)
    for pref, src, table, via, dev in ((100, PRIV, "101", NAT_PRIV, "eth0"), (101, PUB, "102", HA_PUB, "eth1")):
        t.run(mn, "ip", "-4", "rule", "add", "pref", str(pref), "from", src, "lookup", table)
        t.run(mn, "ip", "-4", "route", "add", "default", "via", via, "dev", dev, "table", table)
    yield t
    t.close()


def set_nat(t: Topology, ports: str, timeout: int = 120) -> None:
    """MASQUERADE UDP out of the wan side into ``ports``; conntrack emptied; UDP timeouts."""
    nat = t.hosts["nat"]
    t.run(nat, "iptables", "-t", "nat", "-F", "POSTROUTING")
    t.run(nat, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-p", "udp", "-j", "MASQUERADE",
          "--to-ports", ports)
    for key in ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"):
        t.sysctl(nat, f"net.netfilter.{key}", str(timeout))
    t.run(nat, "conntrack", "-F", check=False)


def start(t: Topology, tmp: Path, mode: str, natka: float) -> tuple[Proc, Proc, dict[str, str]]:
    os.chmod(tmp, 0o755)
    socks = {}
    for role in ("ha", "mn"):
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
[rules]
ipv4 = false
[trace]
path = "{tmp}/{role}-trace.jsonl"
level = "drops"
[control]
socket = "{sock}"
""")
        script = tmp / "mbd_engine.py"
        script.write_text(ENGINE)
        proc = Proc(t, t.hosts[role], [sys.executable, str(script), str(tmp / f"{role}.toml"),
                                       str(tmp / f"{role}.setkey"), LOCAL[role]])
        wait_until(lambda: os.path.exists(sock) or proc.proc.poll() is not None, 20, what=f"{role} engine")
        assert proc.proc.poll() is None, proc.stop()[-3000:]
        socks[role] = sock
    script = tmp / "mbd_mobility.py"
    script.write_text(MOBILITY)
    procs = {}
    for role in ("ha", "mn"):
        control = socks[role] if mode == "api" else str(tmp / "no-such-control.sock")  # heuristic: unreachable
        procs[role] = Proc(t, t.hosts[role], [sys.executable, str(script), role, mode, control, str(natka)], stdin=True)
        procs[role].wait_for("ready", 20)
    return procs["ha"], procs["mn"], socks


def ping_hoa(t: Topology) -> bool:
    return nstool(t, t.hosts["cn"], "ping", HOA, "--count", "3", "--timeout", "2").returncode == 0


def engine_drops(sock: str) -> dict[str, int]:
    return control_request(sock, "status")["drops"]


def stop_all(t: Topology, *procs: Proc) -> list[dict]:
    for p in procs:
        p.stop()
    for p in list(t.procs):
        t.stop(p)
    return [e for p in procs for e in p.events]


def wire_frames(pcap: Path) -> list[tuple[str, str, int, int, int]]:
    """(src, dst, protocol, UDP source port or 0, inner ESP SPI or 0) per IPv4 frame."""
    frames = []
    with pcap.open("rb") as fh:
        for rec in read_pcap(fh):
            p = rec.packet
            if len(p) < 20 or p[0] >> 4 != 4:
                continue
            ihl, proto = (p[0] & 15) * 4, p[9]
            src, dst = ".".join(map(str, p[12:16])), ".".join(map(str, p[16:20]))
            inner = p[ihl + 8:] if proto == 17 else p[ihl:] if proto == 41 else b""
            sport = int.from_bytes(p[ihl:ihl + 2], "big") if proto == 17 else 0
            spi = int.from_bytes(inner[40:44], "big") if len(inner) >= 44 and inner[6] == 50 else 0
            frames.append((src, dst, proto, sport, spi))
    return frames


# --- the tests ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["api", "heuristic"])
def test_nat_walk(topo, tmp_path, mode):
    t = topo
    set_nat(t, "41000-41999")
    ha, mn, socks = start(t, tmp_path, mode, 110.0)
    procs = [ha, mn]
    try:
        # 1. behind the NAT: NAT detected, UDP to the NAT's address and port
        mn.send(f"move {PRIV}")
        bu = ha.wait_for("bu", 10)
        assert bu["status"] == 0 and bu["entry"]["coa"] == PRIV and bu["entry"]["nat"] is True
        assert bu["entry"]["udp_encap"] is True and bu["udp_source"][0] == NAT_WAN
        nat_port = bu["udp_source"][1]
        assert 41000 <= nat_port <= 41999  # the port the NAT chose, not the MN's 40000
        reg = mn.wait_for("registered", 10)
        assert (reg["coa"], reg["udp_encap"], reg["nat"]) == (PRIV, True, True)
        assert ping_hoa(t)

        # 2. garbage on UDP 4191 from the NAT's own address (another port): counted, nothing changes
        st = ha.status()
        before, captured = st["entry"], st["last_bu"]
        drops_before = engine_drops(socks["ha"])
        tunnel_drops_before = sum(st["tunnel"]["drops"].values())
        done = t.run(t.hosts["nat"], sys.executable, "-c", GARBAGE, HA4, captured)
        assert "sent" in done.stdout
        time.sleep(0.5)
        st = ha.status()
        assert st["entry"] == before
        assert sum(st["tunnel"]["drops"].values()) >= tunnel_drops_before + 2  # random, truncated, 0xff
        after = engine_drops(socks["ha"])
        for reason in ("unknown-spi", "replay", "auth-failed"):
            assert after.get(reason, 0) >= drops_before.get(reason, 0) + 1, (reason, after)
        assert ping_hoa(t)

        # 3. move to the public network while a UDP flood runs and the BA is slow (Req #3)
        pcap = tmp_path / "pub.pcap"
        dump = t.spawn(t.hosts["mn"], "tcpdump", "-i", "eth1", "-n", "-U", "-w", str(pcap), "ip",
                       stderr=subprocess.PIPE)
        wait_until(lambda: pcap.exists() and pcap.stat().st_size >= 24, 10, what="tcpdump")
        time.sleep(0.3)
        ha.send("delay-ba 0.4")
        flood = t.spawn(t.hosts["mn"], sys.executable, "-c", FLOOD, CN, "400", "2.5", stdout=subprocess.PIPE)
        time.sleep(1.0)  # data flowing (the heuristic learns the data SPI)
        mn.send(f"move {PUB}")
        bu = ha.wait_for("bu", 10)
        assert bu["entry"]["coa"] == PUB and bu["entry"]["nat"] is False and bu["entry"]["udp_encap"] is False
        assert bu["udp_source"] == [PUB, 40000]
        reg = mn.wait_for("registered", 10, coa=PUB)
        assert (reg["udp_encap"], reg["nat"]) == (False, False)
        flood.wait(20)
        time.sleep(0.3)
        t.stop(dump)
        ha.send("delay-ba 0")
        assert ping_hoa(t)  # now IPv6-in-IPv4 both ways
    finally:
        events = stop_all(t, *procs)
    assert not [e for e in events if e.get("event") == "cleanup-error"]
    mn_stats = next(e for e in mn.events if e["event"] == "stats")
    ha_stats = next(e for e in ha.events if e["event"] == "stats")
    assert not mn_stats["send_errors"] and not ha_stats["send_errors"]
    if mode == "heuristic":
        assert mn_stats["queries"] is None  # no query interface was ever used

    # Req #3 on the wire (MN's public link): the first packet the MN sends there is the BU in UDP;
    # no data packet from the new CoA before the BA arrived
    frames = wire_frames(pcap)
    from_mn = [i for i, f in enumerate(frames) if f[0] == PUB and f[1] == HA4]
    ba_at = next(i for i, f in enumerate(frames) if f[0] == HA4 and f[1] == PUB and f[4] == SPI_BA)
    assert frames[from_mn[0]][2:] == (17, 40000, SPI_BU)
    assert not [i for i in from_mn if i < ba_at and frames[i][4] == SPI_MN_DATA]
    after_ba = [frames[i] for i in from_mn if i > ba_at and frames[i][4] == SPI_MN_DATA]
    assert after_ba and {f[2] for f in after_ba} == {41}  # then data: IPv6-in-IPv4, no NAT

    # ... and in the MN's trace: data kept the old CoA between its BU and the BA
    log = mn_stats["log"]
    bu_at = next(i for i, e in enumerate(log) if e.get("kind") == "signal" and e.get("coa") == PUB)
    acc_at = next(i for i, e in enumerate(log) if e.get("event") == "ba-accepted" and e["coa"] == PUB)
    window = [e for e in log[bu_at:acc_at] if e.get("kind") == "data" and e.get("direction") == "out"]
    assert window and {e["coa"] for e in window} == {PRIV}  # the flood kept going, via the old CoA
    assert log[bu_at]["mode"] == mode and log[bu_at]["outer"] == f"udp {HA4}:4191"
    assert log[bu_at]["spi"] == f"{SPI_BU:#010x}"


@pytest.mark.parametrize("mode", ["api", "heuristic"])
def test_keepalives_and_new_mapping(topo, tmp_path, mode):
    t = topo
    set_nat(t, "41000-41999", timeout=3)  # a NAT that forgets UDP mappings after 3 s
    ha, mn, _ = start(t, tmp_path, mode, 1.0)  # NATKATIMEOUT: the HA suggests 1 s
    procs = [ha, mn]
    try:
        mn.send(f"move {PRIV}")
        first = ha.wait_for("bu", 10)["udp_source"]
        mn.wait_for("registered", 10)

        # idle 5 s > the NAT's timeout: the keepalive BUs keep the mapping
        time.sleep(5)
        assert ha.status()["entry"]["udp_source"] == first
        assert len([e for e in ha.events if e.get("event") == "bu"]) >= 3  # one a second
        assert ping_hoa(t)

        # without keepalives the mapping dies: the HA's packets no longer reach the MN
        mn.send("pause")
        time.sleep(5)
        assert not ping_hoa(t)
        mn.send("resume")  # the overdue refresh BU goes out at once and re-creates a mapping
        wait_until(lambda: ping_hoa(t), 10, interval=0.2, what="ping after keepalives resumed")

        # the NAT changes its mapping (flushed, new port range) while no BU is due
        mn.send("pause")
        time.sleep(0.2)
        set_nat(t, "43000-43999", timeout=3)
        for i in range(3):  # data from the new port reaches the HA ...
            nstool(t, t.hosts["mn"], "udp-send", CN, "9999", f"data-after-flush-{i}")
        time.sleep(0.3)
        st = ha.status()
        assert not 43000 <= st["entry"]["udp_source"][1] <= 43999  # ... but is not followed
        ha.events = [e for e in ha.events if e["_n"] > st["_n"]]  # what came before is history
        assert st["tunnel"]["counts"]["in_udp"] > 0
        mn.send("resume")
        # the next keepalive BU comes from the new port; authenticated, it is followed
        deadline = time.monotonic() + 6
        bu = ha.wait_for("bu", max(0.1, deadline - time.monotonic()))
        assert bu["udp_source"][0] == NAT_WAN and 43000 <= bu["udp_source"][1] <= 43999
        assert "BindingUpdated" in bu["events"]
        assert ping_hoa(t)
    finally:
        events = stop_all(t, *procs)
    assert not [e for e in events if e.get("event") == "cleanup-error"]
