"""The (DS)MIPv6 handover walk in network namespaces, with ``mipbits run`` on the home agent and
the mobile node (root; the topology is scripts/testbed's, drawn at the top of that script)::

    CN ---- R ---- HA ==== home link ==== MN (home | v1 | v4nat | v4pub: one link up at a time)
            |  \\__________ visited IPv6 link v1 _____/ /   /
            |   \\________ IPv4 public link v4pub _____/   /
             \\__ NAT (MASQUERADE) __ IPv4 link v4nat ______/

Once per classification mode (api, heuristic), the correspondent pings the HoA and streams TCP to
it and to the IPv4 home address (both echoed back) while the mobile node walks home -> v1 ->
v4nat -> v4pub -> v1 -> home. tcpdump records R's link to the HA, the visited links (R's side;
the NAT's private side) and the home link. During the second stay on v1 the test sends a BU with
an old sequence number from the mobile node, and replays / forges a captured BU from R. The
tests below then check what the walk left behind:

* both TCP connections survived every move with their data intact (hash on the MN's side, byte
  for byte in the echo) -- the IPv4 one travels as IPv4 inside the IPv6 tunnel SA (4in6);
* on the mobile node's links every packet from or to its addresses (HoA, CoAs) is ESP (Neighbour
  Discovery aside) -- on the IPv4 links inside UDP 4191 or protocol 41 -- and the IPv4 home
  address never appears there; tshark, given the keys of the setkey file, finds the BUs and BAs
  inside the transport-mode SAs (MH types 5 and 6, also in UDP 4191) and TCP (over the IPv6 and
  the IPv4 home address) / ICMPv6 inside the tunnel-mode SAs;
* after each move's BA, every ESP packet the HA sends has the current CoA (or, at home, the HoA;
  behind the NAT, the NAT's address) as outer destination; a NAT is detected exactly behind it;
* both engines' SADs (and SPDs) are the same before and after the walk apart from counters;
* the old sequence number gets status 135 with the HA's last accepted number;
* the replayed and the forged BU change nothing in the binding cache and raise the HA engine's
  replay and authentication drop counters.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bits.setkey import load_setkey
from tests.netns import reap_stale_namespaces

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples" / "testbed"))

from walklib import CN4, COA, HA, HA4, HOA, HOA4, NAT_WAN, WALK, Testbed, WirePacket, ping_window, wire_packets  # noqa: E402

pytestmark = pytest.mark.netns

NETNS_PREFIX = f"mbn-{os.getpid()}-"
PORT, PORT4 = 5001, 5004  # TCP to the HoA, to the IPv4 HoA
DWELL = 2.5  # seconds on each link
ADDRESSES = {HOA, *COA.values()}
SECOND_V1 = 3  # WALK[3]: back on v1, where the negative cases run
IPV4_LINKS = ("r-v4pub", "nat-lan")
BU_SPI, BA_SPI, DATA_SPIS = 0x1001, 0x1002, (0x1007, 0x1008)
MODES = ["api", "heuristic"]

SEND_OLD_BU = r"""
import ipaddress, json, select, sys, time
from mobility.constants import BuFlag
from mobility.io.mhsock import MhSocket
from mobility.mh import BindingAck, BindingUpdate
from mobility.options import AlternateCareOfAddress
hoa, ha, coa, seq = sys.argv[1:5]
sock = MhSocket(hoa)
sock.send(BindingUpdate(int(seq), BuFlag.A | BuFlag.H, 15, (AlternateCareOfAddress(ipaddress.IPv6Address(coa)),)), ha)
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    if select.select([sock], [], [], 0.2)[0]:
        got = sock.recv()
        if got is not None and isinstance(got.message, BindingAck):
            print(json.dumps({"status": int(got.message.status), "seq": got.message.seq, "src": str(got.src)}))
            break
"""

RAW_SEND = r"""
import socket, sys
pkt = bytes.fromhex(sys.stdin.read().strip())
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.sendto(pkt, (socket.inet_ntop(socket.AF_INET6, pkt[24:40]), 0))
"""


@dataclass
class Walk:
    """What one walk left behind for the tests to look at."""

    mode: str
    bed: Testbed
    moves: list[dict[str, Any]] = field(default_factory=list)  # where, t (wall clock), registration
    end: float = 0.0
    sad: dict[str, tuple] = field(default_factory=dict)  # node -> (before, after)
    streams: dict[int, dict[str, Any]] = field(default_factory=dict)  # port -> the CN's report
    sinks: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # port -> the MN's reports
    probes: list[list] = field(default_factory=list)
    pcaps: dict[str, Path] = field(default_factory=dict)
    old_bu: dict[str, Any] = field(default_factory=dict)
    attacks: dict[str, Any] = field(default_factory=dict)

    def packets(self, link: str) -> list[WirePacket]:
        return wire_packets(self.pcaps[link])


# --- running the walk -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=MODES)
def walk(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    if os.geteuid() != 0 or not shutil.which("tcpdump") or not shutil.which("ip6tables"):
        pytest.fail("the handover walk needs root, ip6tables and tcpdump (deselect with -m 'not netns')")
    reap_stale_namespaces("mbn-")  # crashed earlier runs (their PID is in the name)
    run_dir = tmp_path_factory.mktemp(f"walk-{request.param}")
    os.chmod(run_dir, 0o755)
    bed = Testbed(NETNS_PREFIX, str(run_dir))
    w = Walk(request.param, bed)
    try:
        bed.up()
        _run(w)
        yield w
    finally:
        bed.stop_all()
        bed.down()


def _run(w: Walk) -> None:
    bed = w.bed
    bed.render_configs()
    for node in ("ha", "mn"):
        bed.start_mipbits(node, w.mode)
        bed.wait_ready(node)
    before = {node: _sad(bed, node) for node in ("ha", "mn")}
    for name, node, iface in (("r-ha", "r", "ha"), ("r-v1", "r", "v1"), ("r-v4pub", "r", "v4pub"),
                              ("nat-lan", "nat", "lan"), ("home", "ha", "home")):
        w.pcaps[name] = bed.capture(name, node, iface)
    for port in (PORT, PORT4):
        bed.traffic(f"tcp-echo{port}", "mn", "tcp-echo", str(port))
    bed.traffic("ping", "cn", "ping", HOA, "--interval", "0.05")
    bed.traffic(f"tcp-stream{PORT}", "cn", "tcp-stream", HOA, str(PORT), "--rate", "200000")
    bed.traffic(f"tcp-stream{PORT4}", "cn", "tcp-stream", HOA4, str(PORT4), "--rate", "200000", "--seed", "6")
    time.sleep(DWELL)
    where = "home"
    for i, to in enumerate(WALK):
        t = time.time()
        bed.move(to)
        reg = bed.wait_registration(to, i)
        w.moves.append({"from": where, "to": to, "t": t, "reg": reg, "binding": _ha_entry(bed)})
        where = to
        if i == SECOND_V1:  # back on v1: the negative cases while a binding exists
            _old_sequence_number(w)
            _replay_and_forge(w)
        time.sleep(DWELL)
    w.end = time.time()
    for name in (f"tcp-stream{PORT}", f"tcp-stream{PORT4}", "ping"):
        bed.stop(name)
    for port in (PORT, PORT4):
        bed.wait_log(f"tcp-echo{port}", '"received"')
        w.streams[port] = bed.last_json(f"tcp-stream{port}")
        w.sinks[port] = _json_lines(bed.log(f"tcp-echo{port}"))  # one report per connection
    w.probes = bed.last_json("ping")["probes"]
    time.sleep(0.3)  # the last packets into the captures
    for name in w.pcaps:
        bed.stop(name)
    w.sad = {node: (before[node], _sad(bed, node)) for node in ("ha", "mn")}


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _sad(bed: Testbed, node: str) -> tuple:
    """SAs and policies without their counters."""
    st = bed.engine(node)
    counters = {"seq", "packets", "bytes", "replay_drops", "auth_failures", "other_drops"}
    sas = sorted(tuple(sorted((k, repr(v)) for k, v in sa.items() if k not in counters)) for sa in st["sas"])
    policies = st["policies"]
    rows = policies if isinstance(policies, list) else [r for d in ("out", "in") for r in policies.get(d, [])]
    return tuple(sas), tuple(tuple(sorted((k, repr(v)) for k, v in r.items() if k != "hits")) for r in rows)


def _ha_entry(bed: Testbed) -> dict[str, Any] | None:
    entries = [b for b in bed.mobility("ha")["bindings"] if b["hoa"] == HOA and b["state"] == "valid"]
    return entries[0] if entries else None


def _binding(bed: Testbed) -> dict[str, Any]:
    (entry,) = [b for b in bed.mobility("ha")["bindings"] if b["hoa"] == HOA]
    return {k: entry[k] for k in ("coa", "seq", "state", "lifetime", "registered_at")}


def _old_sequence_number(w: Walk) -> None:
    bed = w.bed
    before = _binding(bed)
    old = (before["seq"] - 5) % 65536
    done = bed.exec("mn", sys.executable, "-c", SEND_OLD_BU, HOA, HA, COA["v1"], str(old), timeout=20)
    w.old_bu = {"sent_seq": old, "binding_before": before, "reply": _json_lines(done.stdout),
                "binding_after": _binding(bed), "stderr": done.stderr}


def _replay_and_forge(w: Walk) -> None:
    """A BU the MN sent from v1 on the first visit, captured on R, sent again from R as it was
    (replay), and with a fresh sequence number and a flipped ICV bit (forgery)."""
    bed = w.bed
    bu = next(p for p in wire_packets(w.pcaps["r-v1"]) if p.spi == BU_SPI and p.src == COA["v1"])
    forged = bytearray(bu.packet)
    at = _esp_offset(forged)
    forged[at + 4 : at + 8] = (1 << 20).to_bytes(4, "big")  # far right of the window: passes the replay check
    forged[-1] ^= 0x01  # ... and the ICV cannot match
    results = {}
    for name, packet, counter in (("replayed", bu.packet, "replay"), ("forged", bytes(forged), "auth-failed")):
        binding, drops = _binding(bed), bed.engine("ha").get("drops", {})
        bed.exec("r", sys.executable, "-c", RAW_SEND, input=packet.hex())
        deadline = time.monotonic() + 3
        while bed.engine("ha").get("drops", {}).get(counter, 0) <= drops.get(counter, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        results[name] = {"counter": counter, "drops_before": drops.get(counter, 0),
                         "drops_after": bed.engine("ha").get("drops", {}).get(counter, 0),
                         "binding_before": binding, "binding_after": _binding(bed)}
    w.attacks = results


def _esp_offset(pkt: bytes | bytearray) -> int:
    nh, off = pkt[6], 40
    while nh in (0, 43, 60):
        nh, off = pkt[off], off + (pkt[off + 1] + 1) * 8
    assert nh == 50
    return off


# --- the tests ---------------------------------------------------------------------------------------------------


def test_every_move_registered(walk):
    assert [(m["from"], m["to"]) for m in walk.moves] == [
        ("home", "v1"), ("v1", "v4nat"), ("v4nat", "v4pub"), ("v4pub", "v1"), ("v1", "home")]
    for m in walk.moves:
        reg = m["reg"]
        assert reg["status"] == 0 and reg["kind"] == ("deregister" if m["to"] == "home" else "move"), reg
        assert reg["bu_to_ba"] < 1.0, reg  # one BU, answered at once (no retransmission needed)
        assert (reg["outer"] is not None) == (m["to"] in ("v4nat", "v4pub")), reg  # in UDP from IPv4 CoAs


def test_nat_detected_exactly_behind_the_nat(walk):
    for m in walk.moves:
        reg, entry = m["reg"], m["binding"]
        if m["to"] == "home":
            assert entry is None
            continue
        assert entry["coa"] == COA[m["to"]]
        assert bool(entry["nat_detected"]) == bool(reg.get("nat_detected")) == (m["to"] == "v4nat"), (m["to"], entry)
        if m["to"] == "v4nat":
            assert entry["udp_source"].split(":")[0] == NAT_WAN and entry["udp_encap"]
        elif m["to"] == "v4pub":
            assert entry["udp_source"].split(":")[0] == COA["v4pub"] and not entry["udp_encap"]
        else:
            assert entry["udp_source"] is None
        assert entry["ipv4_hoa"] == HOA4  # granted with every registration (static)


@pytest.mark.parametrize("port", [PORT, PORT4], ids=["ipv6-hoa", "ipv4-hoa"])
def test_tcp_connection_survives_every_move_intact(walk, port):
    stream, sinks = walk.streams[port], walk.sinks[port]
    assert len(sinks) == 1, sinks  # one connection for the whole walk
    assert stream["sent"] > 200_000 * DWELL * len(WALK) * 0.5, stream
    assert stream["intact"] and stream["echoed"] == stream["sent"], stream
    assert (sinks[0]["received"], sinks[0]["sha256"]) == (stream["sent"], stream["sha256"])


def test_pings_answered_after_every_move(walk):
    for i, m in enumerate(walk.moves):
        t1 = walk.moves[i + 1]["t"] if i + 1 < len(walk.moves) else walk.end
        window = ping_window(walk.probes, m["t"], t1)
        answered = window["sent"] - window["lost"]
        assert answered >= window["sent"] // 2, (m["to"], window)


def test_only_esp_between_mobile_node_and_home_agent(walk):
    """On the mobile node's links nothing from or to its addresses travels in clear: IPv6 is ESP,
    IPv4 is UDP 4191 or protocol 41 with ESP inside; the IPv4 HoA's traffic is never seen as such."""
    clear = []
    for link in ("r-v1", *IPV4_LINKS, "home"):
        for p in walk.packets(link):
            if (p.src in ADDRESSES or p.dst in ADDRESSES) and p.spi is None and not _nd(p.packet):
                clear.append((link, p.src, p.dst, p.proto))
            if {p.src, p.dst} & {HOA4, CN4}:
                clear.append((link, p.src, p.dst, p.proto))
    assert not clear, clear[:10]
    esp = sum(1 for link in ("r-v1", "home") for p in walk.packets(link) if p.spi is not None)
    assert esp > 1000
    for link in IPV4_LINKS:
        encaps = {p.encap for p in walk.packets(link) if p.spi is not None}
        assert encaps == ({"udp"} if link == "nat-lan" else {"udp", "ipip"}), (link, encaps)


def _nd(pkt: bytes) -> bool:
    """Neighbour Discovery, or an ICMPv6 error about one of our ESP packets (the kernel's Packet
    Too Big while the testbed takes the old link's address away: it quotes ESP, nothing in clear)."""
    if pkt[6] != 58 or len(pkt) <= 40:
        return False
    return 133 <= pkt[40] <= 137 or (1 <= pkt[40] <= 4 and len(pkt) >= 88 and pkt[48 + 6] == 50)


def test_home_agent_sends_to_the_current_care_of_address(walk):
    """Req #1: after each move's BA, the HA's ESP goes to the new CoA (at home: to the HoA; behind
    the NAT: to the NAT's address, which maps to the CoA). Checked on R's link to the HA (and the
    home link) with the BA in the same capture as the mark."""
    for i, m in enumerate(walk.moves):
        t1 = walk.moves[i + 1]["t"] if i + 1 < len(walk.moves) else walk.end
        link, dst = ("home", HOA) if m["to"] == "home" else ("r-ha", NAT_WAN if m["to"] == "v4nat" else COA[m["to"]])
        pkts = walk.packets(link)
        ba = next(p for p in pkts if p.spi == BA_SPI and p.dst == dst and p.ts >= m["t"])
        sent = [p for link_ in ("r-ha", "home") for p in walk.packets(link_)
                if p.src in (HA, HA4) and p.spi is not None and ba.ts < p.ts < t1]
        assert sent, m
        assert {p.dst for p in sent} == {dst}, (m["to"], sorted({(p.dst, p.ts) for p in sent if p.dst != dst})[:5])


@pytest.mark.tshark
def test_tshark_finds_bu_ba_in_transport_esp_and_payload_in_tunnel_esp(walk, tmp_path):
    if shutil.which("tshark") is None:
        pytest.fail("tshark missing")
    rows = []
    for link in ("r-v1", *IPV4_LINKS, "home"):
        rows += _tshark(walk.pcaps[link], tmp_path)
    by_spi: dict[int, list[dict[str, str]]] = {}
    for r in rows:
        by_spi.setdefault(int(r["esp.spi"].split(",")[0], 16), []).append(r)
    assert all(r["esp.icv_good"] == "1" for r in rows), [r for r in rows if r["esp.icv_good"] != "1"][:3]
    bus, bas = by_spi[BU_SPI], by_spi[BA_SPI]
    assert len(bus) >= 5 and {r["mip6.mhtype"] for r in bus} == {"5"}  # 4 moves + de-registration (+ the old seq)
    assert len(bas) >= 5 and {r["mip6.mhtype"] for r in bas} == {"6"}
    assert any(r["udp.dstport"] == "4191" for r in bus) and any(r["udp.srcport"] == "4191" for r in bas)
    for spi in DATA_SPIS:
        data = by_spi[spi]
        assert all(not r["mip6.mhtype"] for r in data)
        tcp = [r for r in data if r["tcp.srcport"]]
        assert len(tcp) > 100
        assert any(r["icmpv6.type"] in ("128", "129") for r in data)
        # IPv6 inside for the HoA's stream, IPv4 inside (4in6) for the IPv4 HoA's
        six = [r for r in tcp if str(PORT) in (r["tcp.srcport"], r["tcp.dstport"])]
        four = [r for r in tcp if str(PORT4) in (r["tcp.srcport"], r["tcp.dstport"])]
        assert six and all(len(r["ipv6.src"].split(",")) >= 2 for r in six)  # the inner IPv6 header decrypted
        assert four and all(HOA4 in r["ip.src"].split(",") + r["ip.dst"].split(",") for r in four)


def _tshark(pcap: Path, tmp_path: Path) -> list[dict[str, str]]:
    fields = ["esp.spi", "esp.icv_good", "mip6.mhtype", "ipv6.src", "ipv6.dst", "ip.src", "ip.dst", "tcp.srcport",
              "tcp.dstport", "udp.srcport", "udp.dstport", "icmpv6.type"]
    cmd = ["tshark", "-n", "-r", str(pcap), "-d", "udp.port==4191,ipv6", "-o", "esp.enable_encryption_decode:TRUE",
           "-o", "esp.enable_authentication_check:TRUE", "-Y", "esp and not icmpv6.type <= 4", "-T", "fields",
           "-E", "occurrence=a", "-E", "separator=/t"]
    for sa in load_setkey(REPO / "examples" / "testbed" / "mn.setkey", local_addresses=[HOA]).sas:
        cmd += ["-o", f'uat:esp_sa:"IPv6","*","*","{sa.spi:#010x}","AES-GCM with 16 octet ICV [RFC4106]",'
                      f'"0x{sa.enc_key.hex()}","NULL",""']
    for f in fields:
        cmd += ["-e", f]
    env = {**os.environ, "HOME": str(tmp_path)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, timeout=120).stdout
    return [dict(zip(fields, line.split("\t"), strict=True)) for line in out.splitlines()]


def test_sad_and_spd_unchanged_by_the_walk(walk):
    for node, (before, after) in walk.sad.items():
        assert before == after, node
        assert len(before[0]) == 4  # the four SAs of examples/testbed/*.setkey


def test_old_sequence_number_gets_135(walk):
    old = walk.old_bu
    (reply,) = old["reply"] or [None]
    assert reply is not None, old["stderr"]
    assert (reply["status"], reply["seq"], reply["src"]) == (135, old["binding_before"]["seq"], HA)
    assert old["binding_after"] == old["binding_before"]


@pytest.mark.parametrize("attack", ["replayed", "forged"])
def test_replayed_or_forged_bu_changes_nothing(walk, attack):
    result = walk.attacks[attack]
    assert result["binding_after"] == result["binding_before"]
    assert result["drops_after"] > result["drops_before"], result  # counted by the engine: replay / auth-failed
