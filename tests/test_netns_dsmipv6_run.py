"""DSMIPv6 behind a NAT with the real runtime (``mipbits run`` on the HA and the MN, root), in
scripts/testbed's topology (drawn at the top of that script)::

    CN ---- R ---- HA ==== home link ==== MN
            |  \\__ NAT (MASQUERADE) __ v4nat: 192.168.1.100, seen as 100.64.0.2:PORT
             \\_____________________ v4pub: 203.0.113.100 (no NAT)

Namespaces ``mbd-<pid>-*``. Once per classification mode: ``api`` (the engine's control socket)
and ``heuristic`` -- there both engines' control sockets are made unreachable right after the
start (renamed), so any query would fail; the status must show none was made. The HA tells the MN
a NAT Detection refresh time of 1 s (``[ha] nat_refresh_time``), and the NAT forgets idle UDP
mappings after 3 s. The scenario (one per mode, then the tests look at what it left behind):

1. the MN moves behind the NAT: the HA detects the NAT, records the NAT's address and port, and
   the CN's pings reach the MN through it (data in UDP to that address and port, on the wire);
2. 5 s idle: the keepalive BUs (one a second) keep the NAT's mapping -- and the binding;
3. the NAT changes its mapping (new port range, conntrack flushed): the HA follows the new port
   after the next authenticated (keepalive) BU, pings get through again;
4. garbage on UDP 4191 from the NAT's address (random bytes, 0xff, a truncated packet, an unknown
   SPI, a replayed and a forged BU): counted drops in the tunnel module and the engine, the
   binding unchanged;
5. with a UDP flood from the MN running, the MN moves to the public IPv4 network while R holds the
   BA back for 0.4 s: on the MN's new link the first packet is the BU (in UDP, from the new CoA),
   no data packet leaves from the new CoA before the BA arrives, and after it data goes
   IPv6-in-IPv4 (no NAT: no UDP).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bits.io.control import control_request
from tests.netns import reap_stale_namespaces
from tests.test_netns_dsmipv6 import FLOOD, GARBAGE

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples" / "testbed"))

from walklib import CN, COA, HA4, HOA, NAT_WAN, Testbed, WirePacket, ping_window, wire_packets  # noqa: E402

pytestmark = pytest.mark.netns

NETNS_PREFIX = f"mbd-{os.getpid()}-"
MODES = ["api", "heuristic"]
SPI_BU, SPI_BA, SPI_MN_DATA = 0x1001, 0x1002, 0x1007
NAT_TIMEOUT = 3  # seconds the NAT keeps an idle UDP mapping
NEW_PORTS = (43000, 43999)  # the NAT's port range after the change
MN_PORT = 40000  # [mn] udp_port
BA_DELAY = 0.4

# R holds BAs to the public CoA back (a slow path for the BA only: netem is not available here).
DELAY_BA = r"""
import sys, time
from netfilterqueue import NetfilterQueue
delay = float(sys.argv[1])
def cb(pkt):
    p = pkt.get_payload()
    inner = p[(p[0] & 15) * 4 + 8:]
    if len(inner) >= 44 and inner[6] == 50 and inner[40:44] == (0x1002).to_bytes(4, "big"):
        time.sleep(delay)
    pkt.accept()
q = NetfilterQueue()
q.bind(9, cb)
print("ready", flush=True)
q.run()
"""


@dataclass
class Run:
    mode: str
    bed: Testbed
    socks: dict[str, str] = field(default_factory=dict)  # the engines' control sockets (renamed: heuristic)
    nat: dict[str, Any] = field(default_factory=dict)
    keepalive: dict[str, Any] = field(default_factory=dict)
    remap: dict[str, Any] = field(default_factory=dict)
    garbage: dict[str, Any] = field(default_factory=dict)
    handover: dict[str, Any] = field(default_factory=dict)
    status: dict[str, dict[str, Any]] = field(default_factory=dict)
    probes: list[list] = field(default_factory=list)
    pcaps: dict[str, Path] = field(default_factory=dict)

    def answered(self, t0: float, t1: float) -> int:
        window = ping_window(self.probes, t0, t1)
        return window["sent"] - window["lost"]


@pytest.fixture(scope="module", params=MODES)
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    if os.geteuid() != 0 or not shutil.which("tcpdump") or not shutil.which("conntrack"):
        pytest.fail("the DSMIPv6 runtime test needs root, tcpdump and conntrack (deselect with -m 'not netns')")
    reap_stale_namespaces("mbd-")
    run_dir = tmp_path_factory.mktemp(f"dsmipv6-{request.param}")
    os.chmod(run_dir, 0o755)
    bed = Testbed(NETNS_PREFIX, str(run_dir))
    r = Run(request.param, bed)
    try:
        bed.up()
        _scenario(r)
        yield r
    finally:
        bed.stop_all()
        bed.down()


def _binding(bed: Testbed) -> dict[str, Any]:
    (entry,) = [b for b in bed.mobility("ha")["bindings"] if b["hoa"] == HOA]
    return entry


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def _engine(r: Run, node: str) -> dict[str, Any]:
    return control_request(r.socks[node], "status")  # type: ignore[no-any-return]


def _scenario(r: Run) -> None:
    bed = r.bed
    for key in ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"):
        bed.exec("nat", "sysctl", "-qw", f"net.netfilter.{key}={NAT_TIMEOUT}")
    # the MN's UDP port outside NEW_PORTS: the NAT keeps it at first, then must change it
    bed.render_configs(overrides={"ha": {"nat_refresh_time": "1"}, "mn": {"udp_port": str(MN_PORT)}})
    for node in ("ha", "mn"):
        bed.start_mipbits(node, r.mode)
        bed.wait_ready(node)
        r.socks[node] = bed.socket(node)
        if r.mode == "heuristic":  # unreachable from now on: a query would fail
            os.rename(r.socks[node], r.socks[node] + ".hidden")
            r.socks[node] += ".hidden"
    r.pcaps["r-ha"] = bed.capture("r-ha", "r", "ha")
    bed.traffic("ping", "cn", "ping", HOA, "--interval", "0.05")
    _behind_the_nat(r)
    _keepalives(r)
    _new_mapping(r)
    _garbage(r)
    _flood_and_handover(r)
    bed.stop("ping")
    r.probes = bed.last_json("ping")["probes"]
    r.status = {node: bed.mobility(node) for node in ("ha", "mn")}
    bed.stop("r-ha")


def _behind_the_nat(r: Run) -> None:
    bed = r.bed
    t = time.time()
    bed.move("v4nat")
    r.nat["registration"] = bed.wait_registration("v4nat", 0)
    r.nat["binding"] = _binding(bed)
    time.sleep(1.0)
    r.nat["window"] = (t, time.time())


def _keepalives(r: Run) -> None:
    bed = r.bed
    before = bed.mobility("mn")["counters"].get("bu_sent", 0)
    t0 = time.time()
    time.sleep(NAT_TIMEOUT + 2)  # longer than the NAT keeps an idle mapping
    r.keepalive = {"bus": bed.mobility("mn")["counters"].get("bu_sent", 0) - before,
                   "binding": _binding(bed), "window": (t0 + NAT_TIMEOUT, time.time())}


def _new_mapping(r: Run) -> None:
    bed = r.bed
    old = _binding(bed)["udp_source"]
    bed.exec("nat", "iptables", "-t", "nat", "-R", "POSTROUTING", "1", "-o", "wan", "-p", "udp", "-j", "MASQUERADE",
             "--to-ports", f"{NEW_PORTS[0]}-{NEW_PORTS[1]}")
    bed.exec("nat", "conntrack", "-F", check=False)
    t0 = time.time()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _binding(bed)["udp_source"] == old:
        time.sleep(0.05)
    followed = time.time()
    time.sleep(1.0)
    r.remap = {"old": old, "new": _binding(bed)["udp_source"], "after": followed - t0,
               "window": (followed + 0.2, time.time())}


def _garbage(r: Run) -> None:
    bed = r.bed
    bu = next(p for p in reversed(wire_packets(r.pcaps["r-ha"]))
              if p.encap == "udp" and p.spi == SPI_BU and p.src == NAT_WAN)
    captured = _udp_payload(bu)
    before = {"binding": _binding(bed), "engine": _engine(r, "ha")["drops"],
              "tunnel": bed.mobility("ha")["tunnel"]["drops"]}
    done = bed.exec("nat", sys.executable, "-c", GARBAGE, HA4, captured.hex())
    time.sleep(1.5)  # a keepalive BU or two from the genuine endpoint in between
    deadline = time.monotonic() + 10  # on a loaded machine the counters may take longer to move
    while time.monotonic() < deadline and not _garbage_counted(before, bed.mobility("ha")["tunnel"]["drops"],
                                                                _engine(r, "ha")["drops"]):
        time.sleep(0.25)
    r.garbage = {"sent": "sent" in done.stdout, "before": before, "binding": _binding(bed),
                 "engine": _engine(r, "ha")["drops"], "tunnel": bed.mobility("ha")["tunnel"]["drops"]}


def _garbage_counted(before: dict[str, Any], tunnel: dict[str, int], engine: dict[str, int]) -> bool:
    """Every kind of garbage sent has been counted (what the test then asserts)."""
    bt, be = before["tunnel"], before["engine"]
    return (tunnel.get("not-ipv6", 0) >= bt.get("not-ipv6", 0) + 2
            and tunnel.get("malformed", 0) >= bt.get("malformed", 0) + 1
            and all(engine.get(k, 0) >= be.get(k, 0) + 1 for k in ("unknown-spi", "replay", "auth-failed")))


def _udp_payload(p: WirePacket) -> bytes:
    return p.packet[(p.packet[0] & 15) * 4 + 8:]


def _flood_and_handover(r: Run) -> None:
    bed = r.bed
    bed.exec("r", "iptables", "-t", "mangle", "-I", "FORWARD", "-p", "udp", "--sport", "4191", "-d", COA["v4pub"],
             "-j", "NFQUEUE", "--queue-num", "9")
    bed.spawn("delay-ba", "r", sys.executable, "-c", DELAY_BA, str(BA_DELAY))
    bed.wait_log("delay-ba", "ready")
    r.pcaps["r-v4pub"] = bed.capture("r-v4pub", "r", "v4pub")  # the MN's new link
    bed.spawn("flood", "mn", sys.executable, "-c", FLOOD, CN, "400", "3")
    time.sleep(1.0)  # data flowing (the heuristic learns the data SPI)
    t = time.time()
    bed.move("v4pub")
    r.handover["registration"] = bed.wait_registration("v4pub", 1)
    r.handover["binding"] = _binding(bed)
    bed.wait_log("flood", "\n", timeout=10)
    time.sleep(0.5)
    bed.stop("r-v4pub")
    r.handover["window"] = (t, time.time())


# --- the tests ----------------------------------------------------------------------------------------------------


def test_nat_detected_behind_the_nat_with_its_address_and_port(run):
    reg, binding = run.nat["registration"], run.nat["binding"]
    assert reg["status"] == 0 and reg["nat_detected"] is True and reg["udp_encap"] is True, reg
    assert binding["coa"] == COA["v4nat"] and binding["nat_detected"] and binding["udp_encap"], binding
    assert binding["udp_source"] == f"{NAT_WAN}:{MN_PORT}"  # the NAT's address (it kept the port), not the CoA
    assert reg["keepalive"] == 1.0  # the HA's NAT Detection refresh time


def test_data_goes_to_the_recorded_address_and_port(run):
    t0, t1 = run.nat["window"]
    assert run.answered(t0, t1) >= 10
    endpoint = run.nat["binding"]["udp_source"]
    to_mn = [p for p in wire_packets(run.pcaps["r-ha"]) if p.src == HA4 and t0 <= p.ts < t1 and p.spi is not None]
    data = [p for p in to_mn if p.spi != SPI_BA]
    assert data and {(p.encap, p.endpoint("dst")) for p in data} == {("udp", endpoint)}


def test_no_nat_detected_on_the_public_network(run):
    reg, binding = run.handover["registration"], run.handover["binding"]
    assert reg["status"] == 0 and reg["nat_detected"] is False and reg["udp_encap"] is False, reg
    assert binding["udp_source"].split(":")[0] == COA["v4pub"] and not binding["nat_detected"]


def test_keepalives_keep_the_nat_mapping(run):
    k = run.keepalive
    print(f"[{run.mode}] {k['bus']} keepalive BUs in {NAT_TIMEOUT + 2} s, mapping {k['binding']['udp_source']} kept")
    assert k["bus"] >= NAT_TIMEOUT + 1  # one refresh BU a second
    assert k["binding"]["udp_source"] == run.nat["binding"]["udp_source"]  # the same mapping, still
    assert run.answered(*k["window"]) >= 10  # after the NAT's idle timeout


def test_a_new_nat_mapping_is_followed(run):
    m = run.remap
    print(f"[{run.mode}] NAT mapping {m['old']} -> {m['new']} followed after {m['after']:.2f} s")
    assert m["new"] != m["old"] and m["new"].split(":")[0] == NAT_WAN
    assert NEW_PORTS[0] <= _port(m["new"]) <= NEW_PORTS[1]
    assert m["after"] < 3.0  # the next keepalive BU (1 s) carried it
    assert run.answered(*m["window"]) >= 5


def test_garbage_on_udp_4191_is_counted_and_changes_nothing(run):
    g = run.garbage
    assert g["sent"]
    before, after = g["before"]["binding"], g["binding"]
    assert {k: after[k] for k in ("coa", "udp_source", "nat_detected", "state")} == \
        {k: before[k] for k in ("coa", "udp_source", "nat_detected", "state")}
    tunnel_before, tunnel_after = g["before"]["tunnel"], g["tunnel"]
    assert tunnel_after.get("not-ipv6", 0) >= tunnel_before.get("not-ipv6", 0) + 2  # random bytes, 0xff
    assert tunnel_after.get("malformed", 0) >= tunnel_before.get("malformed", 0) + 1  # truncated
    for reason in ("unknown-spi", "replay", "auth-failed"):
        assert g["engine"].get(reason, 0) >= g["before"]["engine"].get(reason, 0) + 1, (reason, g["engine"])


def test_bu_leaves_via_the_new_coa_and_no_data_before_the_ba(run):
    new = COA["v4pub"]
    pkts = [p for p in wire_packets(run.pcaps["r-v4pub"]) if p.spi is not None]
    from_mn = [p for p in pkts if p.src == new and p.dst == HA4]
    ba = next(p for p in pkts if p.src == HA4 and p.dst == new and p.spi == SPI_BA)
    print(f"[{run.mode}] BU first via {new}, BA {ba.ts - from_mn[0].ts:.3f} s later, "
          f"{len([p for p in from_mn if p.spi == SPI_MN_DATA])} data packets from the new CoA, all after the BA")
    assert from_mn[0].spi == SPI_BU and from_mn[0].encap == "udp" and from_mn[0].dport == 4191
    assert not [p for p in from_mn if p.ts < ba.ts and p.spi == SPI_MN_DATA]
    after = [p for p in from_mn if p.ts > ba.ts and p.spi == SPI_MN_DATA]
    assert len(after) > 50 and {p.encap for p in after} == {"ipip"}  # the flood went on, no NAT: protocol 41
    assert ba.ts - from_mn[0].ts >= BA_DELAY * 0.9  # the BA really was late


def test_heuristic_mode_asks_the_engine_nothing(run):
    for node in ("ha", "mn"):
        st = run.status[node]
        assert st["mode"] == run.mode
        if run.mode == "heuristic":
            assert st["queries"] is None and st["tunnel"]["mode"] == "heuristic"
            assert not any(k.startswith("api") for k in st["tunnel"]["reasons"])
        else:
            assert st["queries"] >= 1 and st["tunnel"]["reasons"].get("api-unavailable", 0) == 0


def test_decisions_are_in_the_trace(run):
    """``mipbits trace tail`` material: the MN's BU in UDP with mode, SPI, CoA and outer path; the
    HA's record given to the authenticated BU, with the reason."""
    mn = _trace(run, "mn")
    ha = _trace(run, "ha")
    signal = [e for e in mn if e.get("event") == "tunnel" and e.get("kind") == "signal" and e.get("outer")]
    assert signal and all(e["mode"] == run.mode for e in signal)
    assert {e["outer"] for e in signal} == {f"udp {HA4}:4191"} and {e["spi"] for e in signal} == {SPI_BU}
    assert {e["coa"] for e in signal} >= {COA["v4nat"], COA["v4pub"]}
    commits = [e for e in ha if e.get("event") == "tunnel" and e.get("kind") == "commit"]
    expected = {"record-seq"} if run.mode == "api" else {"record-latest", "record-binding"}
    assert commits and {e["why"] for e in commits} <= expected | {"record-binding"}, {e["why"] for e in commits}
    assert any(e["outer"].startswith(f"udp {NAT_WAN}:") for e in commits)
    updated = [e for e in ha if e.get("event") == "binding-updated" and "outer" in e]
    assert any(NEW_PORTS[0] <= _port(e["outer"]) <= NEW_PORTS[1] and e["nat"] for e in updated)


def _trace(run: Run, node: str) -> list[dict[str, Any]]:
    import json

    path = run.bed.run_dir / node / "trace.jsonl"
    return [rec for line in path.read_text().splitlines() if line.startswith("{")
            if (rec := json.loads(line)).get("component") == "mobility"]
