"""IPv4 inside an IPv6 tunnel SA through two real engines on NFQUEUE (root): bits.io.crossfamily.

::

    +-----------------------------+   eth0 (IPv6 only for this traffic)   +-----------------------------+
    | {p}a                        |---------------------------------------| {p}b                        |
    | fd66:1::1 (tunnel endpoint) |   IPv6 ESP 0x2001 a->b, 0x2002 b->a   | fd66:1::2 (tunnel endpoint) |
    | 10.99.0.1/32 on lo          |                                       | 10.99.0.2/32 on lo          |
    | 10.99.0.2/32 dev eth0       |                                       | 10.99.0.1/32 dev eth0       |
    | engine + CrossFamilyEngine  |                                       | engine + CrossFamilyEngine, |
    |                             |                                       | rp_filter = 1               |
    +-----------------------------+                                       +-----------------------------+

({p} = ``mbd-<pid>-``.) The IPv4 addresses exist only inside the tunnel: an IPv4 packet from
10.99.0.1 to 10.99.0.2 is queued in a's IPv4 OUTPUT hook, the engine protects it with the IPv6
SA, NFQUEUE cannot put the IPv6 result into the IPv4 skb, so the adapter drops the original and
the emitter sends the ESP packet through a raw IPv6 socket, marked; b's engine decapsulates it in
raw PREROUTING (IPv6) and the emitter delivers the inner IPv4 packet through a raw IPv4 socket to
its local destination -- with rp_filter on, from a source b has no route back to but the tunnel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bits.io.control import control_request
from tests.netns import Topology, have_netns, nstool, spawn_nstool, two_hosts, wait_until

pytestmark = pytest.mark.netns

NETNS_PREFIX = "mbd-"
A6, B6, A4, B4 = "fd66:1::1", "fd66:1::2", "10.99.0.1", "10.99.0.2"
PORT = 7000
REPO = Path(__file__).resolve().parents[1]

SAS = f"""
add {A6} {B6} esp 0x2001 -m tunnel -u 1 -E aes-gcm-16 0x{'21' * 20};
add {B6} {A6} esp 0x2002 -m tunnel -u 2 -E aes-gcm-16 0x{'22' * 20};
"""
SPD = {
    "a": f"""
spdadd {A4}/32 {B4}/32 any -P out ipsec esp/tunnel/{A6}-{B6}/unique:1;
spdadd {B4}/32 {A4}/32 any -P in ipsec esp/tunnel/{B6}-{A6}/unique:2;
spddefault out bypass;
spddefault in bypass;
""",
    "b": f"""
spdadd {B4}/32 {A4}/32 any -P out ipsec esp/tunnel/{B6}-{A6}/unique:2;
spdadd {A4}/32 {B4}/32 any -P in ipsec esp/tunnel/{A6}-{B6}/unique:1;
spddefault out bypass;
spddefault in bypass;
""",
}

ENGINE = r'''
import os, sys, time
from bits.engine import build_engine
from bits.io.crossfamily import CrossFamilyEmitter, CrossFamilyEngine
from bits.io.iptables import rules_install, rules_remove
from bits.io.nfqueue import run_processor
from bits.setkey import parse_setkey
from mipbits.nodeconfig import load_node_config

cfg = load_node_config(sys.argv[1])
text = open(sys.argv[2]).read()
rules_install(cfg)
try:
    run_processor(cfg, lambda tracer, direction: CrossFamilyEngine(build_engine(
        parse_setkey(text, local_addresses=[sys.argv[3]]), rand=os.urandom, now=time.monotonic(), tracer=tracer),
        CrossFamilyEmitter(cfg.rules.emitted_mark)))
finally:
    rules_remove(cfg)
'''


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Topology, dict[str, str]]]:
    if not have_netns():
        pytest.fail("netns tests need root, ip and iptables (deselect with -m 'not netns')")
    topo = Topology(NETNS_PREFIX)
    try:
        two_hosts(NETNS_PREFIX, topo)
        tmp = tmp_path_factory.mktemp("crossfamily")
        os.chmod(tmp, 0o755)
        socks = {}
        for side, local, own, peer in (("a", A6, A4, B4), ("b", B6, B4, A4)):
            ns = topo.hosts[side].ns
            topo.run(ns, "ip", "addr", "add", f"{own}/32", "dev", "lo")
            topo.run(ns, "ip", "route", "add", f"{peer}/32", "dev", "eth0", "src", own)
            if side == "b":
                for dev in ("all", "default", "lo", "eth0"):
                    topo.sysctl(ns, f"net.ipv4.conf.{dev}.rp_filter", "1")
            socks[side] = _start_engine(topo, tmp, side, local)
        yield topo, socks
    finally:
        topo.close()


def _start_engine(topo: Topology, tmp: Path, side: str, local: str) -> str:
    sock = str(tmp / f"{side}.sock")
    (tmp / f"{side}.setkey").write_text(SAS + SPD[side])
    (tmp / f"{side}.toml").write_text(f"""
[node]
name = "{side}"
[ipsec]
state_dir = "{tmp}/{side}-state"
[queues]
outbound = 0
inbound = 1
[control]
socket = "{sock}"
""")
    (tmp / "engine.py").write_text(ENGINE)
    proc = topo.spawn(topo.hosts[side].ns, sys.executable, str(tmp / "engine.py"), str(tmp / f"{side}.toml"),
                      str(tmp / f"{side}.setkey"), local, stderr=subprocess.PIPE)
    wait_until(lambda: os.path.exists(sock) or proc.poll() is not None, 20, what=f"engine {side}")
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    return sock


def test_ipv4_tcp_through_an_ipv6_tunnel_sa_with_only_esp_on_the_wire(pair):
    topo, socks = pair
    a, b = topo.hosts["a"].ns, topo.hosts["b"].ns
    spawn_nstool(topo, b, "tcp-echo", str(PORT))
    sniff = topo.spawn(b, sys.executable, str(REPO / "tests" / "nstool.py"), "sniff", "eth0", "--src", A4, B4,
                       "--duration", "4", stdout=subprocess.PIPE)
    assert sniff.stdout is not None and sniff.stdout.readline().strip() == b"ready"
    started = time.monotonic()
    done = nstool(topo, a, "tcp-check", B4, str(PORT), "--bytes", "300000")
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 4
    out, _ = sniff.communicate(timeout=10)
    assert int(out.split()[-1]) == 0  # no IPv4 packet of the tunnelled addresses on the wire

    for side in ("a", "b"):
        st = control_request(socks[side], "status")
        emitted = st["emitted"]
        assert emitted["errors"] == {} and emitted["sent"]["ipv6"] > 100 and emitted["sent"]["ipv4"] > 100, emitted
        queues = st["processor"]["queues"]
        assert queues["0"]["dropped"] >= emitted["sent"]["ipv6"]  # each IPv4 original, dropped once ...
        assert queues["0"]["accepted"] < 10  # ... and the emitted ESP not queued again (the mark)
        assert queues["0"]["errors"] == queues["1"]["errors"] == 0
        assert not {"replay", "auth-failed", "selector-mismatch", "unknown-spi"} & set(st["drops"]), st["drops"]

