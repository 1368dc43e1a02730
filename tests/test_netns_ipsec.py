"""ESP between real hosts: ``mipbits run`` on A and B, real NFQUEUE and iptables, a capture on R.

    +-------------+       veth        +-------------+       veth        +-------------+
    | mbi-a       | eth0 ------- eth0 | mbi-r       | eth1 ------- eth0 | mbi-b       |
    | 10.66.1.1   |                   | (capture)   |                   | 10.66.2.1   |
    | fd66:1::1   |                   | forwarding  |                   | fd66:2::1   |
    +-------------+                   +-------------+                   +-------------+

IPv6 between A and B: ESP transport mode (AES-GCM-128); IPv4: ESP tunnel mode A<->B (AES-GCM-256)
in the v4 tunnel, except UDP port 7777 (BYPASS both ways) and UDP port 9 (DISCARD on A).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.netns import (
    Topology,
    a_r_b,
    have_netns,
    nstool,
    ping_ok,
    spawn_nstool,
    wait_until,
)

pytestmark = pytest.mark.netns

NETNS_PREFIX = "mbi-"
A4, B4, A6, B6 = "10.66.1.1", "10.66.2.1", "fd66:1::1", "fd66:2::1"
K6_AB = "0x" + "a1" * 16 + "01020304"
K6_BA = "0x" + "b2" * 16 + "05060708"
K4_AB = "0x" + "c3" * 32 + "090a0b0c"
K4_BA = "0x" + "d4" * 32 + "0d0e0f10"

SAS = f"""
add {A6} {B6} esp 0x2001 -m transport -E aes-gcm-16 {K6_AB};
add {B6} {A6} esp 0x2002 -m transport -E aes-gcm-16 {K6_BA};
add {A4} {B4} esp 0x2003 -m tunnel -E aes-gcm-16 {K4_AB};
add {B4} {A4} esp 0x2004 -m tunnel -E aes-gcm-16 {K4_BA};
"""


def _policies(me6: str, peer6: str, me4: str, peer4: str) -> str:
    return f"""
spdadd {me6} {peer6}[9] udp -P out discard;
spdadd {me6} {peer6}[7777] udp -P out none;
spdadd {peer6} {me6}[7777] udp -P in none;
spdadd {me6} {peer6} any -P out ipsec esp/transport//require;
spdadd {peer6} {me6} any -P in ipsec esp/transport//require;
spdadd {me4} {peer4} any -P out ipsec esp/tunnel/{me4}-{peer4}/require;
spdadd {peer4} {me4} any -P in ipsec esp/tunnel/{peer4}-{me4}/require;
"""


NODE_TOML = """
[node]
name = "{name}"
role = "ipsec"
[ipsec]
sa_file = "{name}.setkey"
state_dir = "{run}/{name}-state"
[queues]
outbound = 0
inbound = 1
[trace]
path = "{run}/{name}-trace.jsonl"
level = "all"
[control]
socket = "{run}/{name}.sock"
"""


class Node:
    def __init__(self, topo: Topology, ns: str, name: str, run: str, setkey: str) -> None:
        self.topo, self.ns, self.name = topo, ns, name
        self.conf = os.path.join(run, f"{name}.toml")
        self.sock = os.path.join(run, f"{name}.sock")
        self.trace = os.path.join(run, f"{name}-trace.jsonl")
        sa = os.path.join(run, f"{name}.setkey")
        with open(os.open(sa, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(setkey)
        with open(self.conf, "w") as f:
            f.write(NODE_TOML.format(name=name, run=run))
        self.proc: subprocess.Popen | None = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.topo.run(self.ns, sys.executable, "-m", "mipbits.cli", *args, check=check)

    def start(self) -> None:
        self.proc = self.topo.spawn(self.ns, sys.executable, "-m", "mipbits.cli", "run", "-c", self.conf,
                                    stderr=subprocess.PIPE)
        wait_until(lambda: self.status() is not None, timeout=20, what=f"{self.name} processor up")

    def status(self) -> dict | None:
        done = self.cli("status", "-c", self.conf, "--json", check=False)
        if done.returncode != 0:
            return None
        import json

        return json.loads(done.stdout)

    def sa(self, spi: int) -> dict:
        st = self.status()
        assert st is not None
        return next(s for s in st["sas"] if s["spi"] == spi)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if not have_netns():
        pytest.fail("netns tests need root, ip and iptables (deselect with -m 'not netns')")
    run = str(tmp_path_factory.mktemp("ipsec-run"))
    topo = Topology(NETNS_PREFIX)
    try:
        a_r_b(NETNS_PREFIX, topo)
        ha, hb = topo.hosts["a"], topo.hosts["b"]
        before = {n: topo.run(n, "iptables-save").stdout + topo.run(n, "ip6tables-save").stdout
                  for n in (ha.ns, hb.ns)}
        a = Node(topo, ha.ns, "a", run, SAS + _policies(A6, B6, A4, B4))
        b = Node(topo, hb.ns, "b", run, SAS + _policies(B6, A6, B4, A4))
        for n in (a, b):
            n.cli("rules", "install", "-c", n.conf)
            n.start()
        yield topo, a, b, before, run
    finally:
        topo.close()


def _capture(topo: Topology, dev: str, path: str) -> subprocess.Popen:
    proc = topo.spawn(topo.hosts["r"].ns, "tcpdump", "-U", "-n", "-i", dev, "-w", path, stderr=subprocess.PIPE)
    time.sleep(1.0)  # tcpdump has no "ready" line on a pipe we could wait for cheaply
    return proc


def _stop_capture(topo: Topology, proc: subprocess.Popen) -> None:
    time.sleep(1.0)  # let tcpdump drain its buffer before it is told to stop
    topo.stop(proc, signal.SIGINT)
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert " captured" in err, f"tcpdump: {err}"


def _tshark(path: str, home: str, *fields: str) -> list[list[str]]:
    uat = [
        f'uat:esp_sa:"IPv6","*","*","0x00002001","AES-GCM with 16 octet ICV [RFC4106]","{K6_AB}","NULL",""',
        f'uat:esp_sa:"IPv6","*","*","0x00002002","AES-GCM with 16 octet ICV [RFC4106]","{K6_BA}","NULL",""',
        f'uat:esp_sa:"IPv4","*","*","0x00002003","AES-GCM with 16 octet ICV [RFC4106]","{K4_AB}","NULL",""',
        f'uat:esp_sa:"IPv4","*","*","0x00002004","AES-GCM with 16 octet ICV [RFC4106]","{K4_BA}","NULL",""',
    ]
    args = ["tshark", "-n", "-r", path, "-o", "esp.enable_encryption_decode:TRUE",
            "-o", "esp.enable_authentication_check:TRUE"]
    for u in uat:
        args += ["-o", u]
    args += ["-T", "fields", "-E", "separator=|"]
    for f in fields:
        args += ["-e", f]
    out = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, HOME=home), check=True).stdout
    return [line.split("|") for line in out.splitlines() if line]


def test_protected_traffic_is_only_esp_on_the_wire_and_tshark_decrypts_it(lab):
    topo, a, b, _, run = lab
    cap = os.path.join(run, "wire.pcap")
    sniffer = _capture(topo, "eth0", cap)
    echo = spawn_nstool(topo, b.ns, "tcp-echo", "5001")
    try:
        assert ping_ok(topo, a.ns, B6), "ICMPv6 echo over ESP transport"
        assert ping_ok(topo, a.ns, B4), "ICMP echo over ESP tunnel"
        assert nstool(topo, a.ns, "tcp-check", B6, "5001", "--bytes", "200000").returncode == 0
        assert nstool(topo, a.ns, "tcp-check", B4, "5001", "--bytes", "200000").returncode == 0
        assert nstool(topo, a.ns, "udp-send", B6, "6000", "hello-udp6", "--count", "3").returncode == 0
    finally:
        topo.stop(echo)
        _stop_capture(topo, sniffer)
    rows = _tshark(cap, run, "ip.proto", "ipv6.nxt", "esp.spi", "esp.icv_good", "tcp.port", "ip.src", "ipv6.src",
                   "ip.dst", "ipv6.dst")
    assert rows, "nothing captured"
    outer = lambda v: v.split(",")[0]  # noqa: E731  (decrypted tunnel packets list inner values too)
    ends = {A4, B4, A6, B6}
    a_b = [r for r in rows if {outer(r[5]), outer(r[7])} <= ends or {outer(r[6]), outer(r[8])} <= ends]
    assert len(a_b) > 100
    # every packet between A and B on the wire is ESP (protocol / next header 50) with a good ICV
    assert all("50" in (outer(r[0]), outer(r[1])) for r in a_b), [r for r in a_b if "50" not in r[0] + r[1]][:3]
    assert all(r[3] == "1" for r in a_b), [r for r in a_b if r[3] != "1"][:5]
    spis = {r[2] for r in a_b}
    assert {"0x00002001", "0x00002002", "0x00002003", "0x00002004"} <= spis
    assert any(r[4] for r in a_b), "tshark found TCP inside the decrypted ESP"


def test_bypass_and_discard(lab):
    topo, a, b, _, run = lab
    listener = spawn_nstool(topo, b.ns, "udp-listen", "7777", "--duration", "3", "--count", "2")
    cap = os.path.join(run, "bypass.pcap")
    sniffer = _capture(topo, "eth0", cap)
    try:
        nstool(topo, a.ns, "udp-send", B6, "7777", "clear-text-ok", "--count", "2")
        nstool(topo, a.ns, "udp-send", B6, "9", "discard-me", "--count", "2")
        out, _ = listener.communicate(timeout=10)
    finally:
        _stop_capture(topo, sniffer)
    assert out.decode().count("clear-text-ok") == 2
    rows = _tshark(cap, run, "udp.dstport", "ipv6.nxt")
    assert ["7777", "17"] in rows  # BYPASS: in clear
    assert not any(r[0] == "9" for r in rows)  # DISCARD: never on the wire
    st = a.status()
    assert st["drops"].get("discard-policy", 0) >= 2


def test_replayed_and_forged_esp_are_counted_drops(lab):
    topo, a, b, _, run = lab
    cap = os.path.join(run, "replay.pcap")
    sniffer = _capture(topo, "eth1", cap)
    try:
        nstool(topo, a.ns, "udp-send", B6, "6000", "once", "--count", "1")
    finally:
        _stop_capture(topo, sniffer)
    from scapy.layers.inet6 import IPv6
    from scapy.utils import rdpcap

    esp = [bytes(p[IPv6]) for p in rdpcap(cap) if IPv6 in p and p[IPv6].nh == 50 and p[IPv6].src == A6]
    assert esp, "the UDP datagram crossed R as ESP"
    before = b.sa(0x2001)
    forged = bytearray(esp[-1])
    forged[44:48] = (before["seq"] + 1000).to_bytes(4, "big")  # a fresh number, so only the ICV can fail
    forged[-1] ^= 0x80
    inject = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_INET6,socket.SOCK_RAW,socket.IPPROTO_RAW)\n"
        "for h in sys.argv[2:]:\n"
        "    s.sendto(bytes.fromhex(h),(sys.argv[1],0))\n"
    )
    topo.run(topo.hosts["r"].ns, sys.executable, "-c", inject, B6, esp[-1].hex(), bytes(forged).hex())
    wait_until(lambda: b.sa(0x2001)["replay_drops"] == before["replay_drops"] + 1, what="replay counted")
    wait_until(lambda: b.sa(0x2001)["auth_failures"] == before["auth_failures"] + 1, what="forgery counted")
    drops = b.status()["drops"]
    assert drops.get("replay", 0) >= 1 and drops.get("auth-failed", 0) >= 1
    tail = b.cli("trace", "tail", "-c", b.conf, "--event", "drop", "--json", "-n", "50").stdout
    assert '"reason":"replay"' in tail and '"reason":"auth-failed"' in tail


def test_kill_9_fails_closed_then_restart_never_reuses_an_iv(lab):
    topo, a, b, _, run = lab
    cap = os.path.join(run, "kill.pcap")
    sniffer = _capture(topo, "eth0", cap)
    try:
        nstool(topo, a.ns, "udp-send", B6, "6000", "before-kill", "--count", "3")
        assert a.proc is not None
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(timeout=10)
        assert not ping_ok(topo, a.ns, B6, timeout_s=1), "no processor: protected traffic must stop"
        nstool(topo, a.ns, "udp-send", B6, "6000", "while-dead", "--count", "3")
        a.start()
        wait_until(lambda: ping_ok(topo, a.ns, B6), timeout=15, what="traffic after restart")
        nstool(topo, a.ns, "udp-send", B6, "6000", "after-restart", "--count", "3")
    finally:
        _stop_capture(topo, sniffer)
    rows = _tshark(cap, run, "ipv6.src", "ipv6.nxt", "esp.spi", "esp.iv", "data.data", "ipv6.dst")
    from_a = [r for r in rows if r[0] == A6 and r[5] == B6]
    assert from_a and all(r[1] == "50" for r in from_a), "nothing left A in clear"
    assert not any(b"while-dead".hex() in r[4] for r in rows)
    ivs = [r[3] for r in from_a if r[2] == "0x00002001" and r[3]]
    if not ivs:  # tshark 4.0 shows the GCM IV inside the decrypted tree only; fall back to raw bytes
        from scapy.layers.inet6 import IPv6
        from scapy.utils import rdpcap

        ivs = [bytes(p[IPv6])[48:56].hex() for p in rdpcap(cap)
               if IPv6 in p and p[IPv6].src == A6 and p[IPv6].nh == 50 and bytes(p[IPv6])[40:44] == b"\x00\x00\x20\x01"]
    assert len(ivs) >= 6 and len(set(ivs)) == len(ivs), "an IV was used twice across the restart"


def test_rules_remove_restores_the_ruleset(lab):
    topo, a, b, before, _ = lab
    for n in (a, b):
        if n.proc is not None:
            topo.stop(n.proc)
        n.cli("rules", "remove", "-c", n.conf)
        after = topo.run(n.ns, "iptables-save").stdout + topo.run(n.ns, "ip6tables-save").stdout
        strip = lambda t: [ln for ln in t.splitlines() if not ln.startswith("#")]  # noqa: E731
        assert strip(after) == strip(before[n.ns])
