"""tshark 4.0 (packet-mip6.c) dissects our IPv6 + Mobility Header packets: no malformed/warning
expert items, the right mip6.* fields, and the checksum scapy computes for the same packet."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from ipaddress import IPv6Address
from pathlib import Path

import pytest

from mobility.constants import BaFlag, BaStatus, BeStatus, BuFlag, Ipv4AckStatus
from mobility.ipv6ext import push_mh_packet
from mobility.mh import (
    BindingAck,
    BindingRefreshRequest,
    BindingUpdate,
    CareOfTest,
    CareOfTestInit,
    HomeTest,
    HomeTestInit,
    make_binding_error,
)
from mobility.options import (
    AlternateCareOfAddress,
    BindingAuthorizationData,
    BindingRefreshAdvice,
    Ipv4AddressAck,
    Ipv4CareOfAddress,
    Ipv4HomeAddress,
    NatDetection,
    NonceIndices,
)

pytestmark = pytest.mark.tshark

HOA, HA, COA, CN = "2001:db8:1::100", "2001:db8:1::1", "2001:db8:f::100", "2001:db8:c::1"
LINKTYPE_RAW = 101
PI_WARN = 0x00600000  # epan/proto.h expert severity

# (packet kwargs for push_mh_packet, expected tshark fields); addresses: src, dst, hoa, rh2_hoa
CASES = [
    (
        dict(  # home registration from an IPv6 CoA, asking for an IPv4 HoA prefix and forcing UDP
            msg=BindingUpdate(
                1000,
                BuFlag.A | BuFlag.H | BuFlag.K | BuFlag.F,
                900,
                (AlternateCareOfAddress(COA), Ipv4HomeAddress("10.1.2.3", 24, True), Ipv4CareOfAddress("192.0.2.10")),
            ),
            src=COA, dst=HA, hoa=HOA,
        ),
        {
            "mip6.mhtype": "5", "mip6.bu.seqnr": "1000", "mip6.bu.lifetime": "900",
            "mip6.bu.a_flag": "1", "mip6.bu.h_flag": "1", "mip6.bu.l_flag": "0", "mip6.bu.k_flag": "1",
            "mip6.bu.f_flag": "1", "mip6.bu.t_flag": "0", "mip6.acoa.acoa": COA,
            "mip6.ipv4ha.preflen": "24", "mip6.ipv4ha.p_flag": "1", "mip6.ipv4ha.ha": "10.1.2.3",
            "mip6.ipv4coa.addr": "192.0.2.10", "ipv6.opt.type": "0x01,0xc9",
        },
    ),
    (
        dict(  # its BA, sent to the CoA with a type 2 routing header
            msg=BindingAck(
                BaStatus.ACCEPTED, BaFlag.K, 1000, 900,
                (BindingRefreshAdvice(600), Ipv4AddressAck(Ipv4AckStatus.SUCCESS, 24, "10.1.2.3"), NatDetection(True, 110)),
            ),
            src=HA, dst=COA, rh2_hoa=HOA,
        ),
        {
            "mip6.mhtype": "6", "mip6.ba.status": "0", "mip6.ba.k_flag": "1", "mip6.ba.seqnr": "1000",
            "mip6.ba.lifetime": "900", "mip6.bra.interval": "600", "mip6.ipv4aa.sts": "0",
            "mip6.ipv4ha.preflen": "24", "mip6.ipv4ha.ha": "10.1.2.3",
            "mip6.natd.f_flag": "1", "mip6.natd.refresh_t": "110", "ipv6.routing.type": "2",
            "ipv6.routing.segleft": "1",
        },
    ),
    (
        dict(  # BU from an IPv4-only network (inner IPv6 header; UDP/IPv4 wrapping not shown)
            msg=BindingUpdate(7, BuFlag.A | BuFlag.H, 27, (Ipv4HomeAddress("0.0.0.0"), Ipv4CareOfAddress("198.51.100.9"))),
            src=HOA, dst=HA,
        ),
        {"mip6.mhtype": "5", "mip6.bu.seqnr": "7", "mip6.bu.k_flag": "0", "mip6.bu.f_flag": "0",
         "mip6.ipv4ha.preflen": "32", "mip6.ipv4ha.p_flag": "0", "mip6.ipv4ha.ha": "0.0.0.0",
         "mip6.ipv4coa.addr": "198.51.100.9"},
    ),
    (
        dict(  # refused IPv4 HoA, no NAT: refresh time all ones
            msg=BindingAck(0, BaFlag(0), 7, 27,
                           (Ipv4AddressAck(Ipv4AckStatus.DYNAMIC_HOA_NOT_AVAILABLE, 0, "0.0.0.0"), NatDetection(False, 0xFFFFFFFF))),
            src=HA, dst=HOA,
        ),
        {"mip6.mhtype": "6", "mip6.ba.k_flag": "0", "mip6.ipv4aa.sts": "132", "mip6.natd.f_flag": "0",
         "mip6.natd.refresh_t": "4294967295"},
    ),
    (
        dict(msg=BindingAck(BaStatus.SEQ_OUT_OF_WINDOW, BaFlag.K, 999, 0), src=HA, dst=HOA),
        {"mip6.mhtype": "6", "mip6.ba.status": "135", "mip6.ba.seqnr": "999", "mip6.ba.lifetime": "0"},
    ),
    (
        dict(msg=make_binding_error(BeStatus.UNKNOWN_MH_TYPE, HOA), src=HA, dst=COA),
        {"mip6.mhtype": "7", "mip6.be.status": "2", "mip6.be.haddr": HOA},
    ),
    (dict(msg=BindingRefreshRequest(), src=CN, dst=HOA), {"mip6.mhtype": "0", "mip6.hlen": "0"}),
    (
        dict(msg=HomeTestInit(bytes.fromhex("0102030405060708")), src=HOA, dst=CN),
        {"mip6.mhtype": "1", "mip6.hoti.cookie": "0x0102030405060708"},
    ),
    (
        dict(msg=CareOfTestInit(bytes.fromhex("1112131415161718")), src=COA, dst=CN),
        {"mip6.mhtype": "2", "mip6.coti.cookie": "0x1112131415161718"},
    ),
    (
        dict(msg=HomeTest(5, bytes.fromhex("0102030405060708"), bytes.fromhex("a1a2a3a4a5a6a7a8")), src=CN, dst=HOA),
        {"mip6.mhtype": "3", "mip6.hot.nindex": "5", "mip6.hot.token": "0xa1a2a3a4a5a6a7a8"},
    ),
    (
        dict(msg=CareOfTest(6, bytes.fromhex("1112131415161718"), bytes.fromhex("b1b2b3b4b5b6b7b8")), src=CN, dst=COA),
        {"mip6.mhtype": "4", "mip6.cot.nindex": "6", "mip6.cot.cookie": "0x1112131415161718"},
    ),
    (
        dict(  # BU to a correspondent: Nonce Indices + Binding Authorization Data (last, 8n+2)
            msg=BindingUpdate(3, BuFlag.A, 100, (NonceIndices(5, 6), BindingAuthorizationData(bytes(range(12))))),
            src=COA, dst=CN, hoa=HOA,
        ),
        {"mip6.mhtype": "5", "mip6.ni.hni": "5", "mip6.ni.cni": "6", "mip6.bu.h_flag": "0"},
    ),
]


def write_pcap(path: Path, packets: list[bytes]) -> None:
    """Minimal libpcap writer, LINKTYPE_RAW (first octet of each record is the IP header)."""
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_RAW))
        for i, pkt in enumerate(packets):
            f.write(struct.pack("<IIII", i, 0, len(pkt), len(pkt)) + pkt)


def tshark_fields(pcap: Path, fields: list[str], home: Path) -> list[dict[str, str]]:
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.fail("tshark is not installed (deselect with -m 'not tshark')")
    cmd = [tshark, "-n", "-r", str(pcap), "-T", "fields", "-E", "separator=\t", "-E", "occurrence=a"]
    for f in fields:
        cmd += ["-e", f]
    env = dict(os.environ, HOME=str(home))  # no user preferences
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return [dict(zip(fields, line.split("\t"))) for line in out.splitlines()]


def scapy_checksum(pkt: bytes, hoa, rh2) -> int:
    from scapy.layers.inet6 import IPv6

    from .test_mh_scapy import MH_LAYERS, scapy_rebuilt

    p = IPv6(scapy_rebuilt(pkt, hoa, rh2))
    return next(p.getlayer(c) for c in MH_LAYERS if p.haslayer(c)).cksum


def test_tshark_dissects_our_packets(tmp_path):
    packets = [push_mh_packet(**kw) for kw, _ in CASES]
    pcap = tmp_path / "mh.pcap"
    write_pcap(pcap, packets)
    expected_fields = sorted({f for _, exp in CASES for f in exp})
    fields = ["frame.number", "_ws.malformed", "_ws.expert.severity", "mip6.csum", "mip6.proto", "mip6.hlen", *expected_fields]
    rows = tshark_fields(pcap, fields, tmp_path)
    assert len(rows) == len(CASES)
    for (kw, exp), pkt, row in zip(CASES, packets, rows):
        assert row["_ws.malformed"] == "", row
        severities = [int(s) for s in row["_ws.expert.severity"].split(",") if s]
        assert all(s < PI_WARN for s in severities), row
        assert row["mip6.proto"] == "59"
        assert int(row["mip6.hlen"]) == (len(pkt) - pkt_mh_offset(kw)) // 8 - 1
        for field, value in exp.items():
            got = row[field]
            if value and ":" in value and "," not in value:  # IPv6 address: compare as addresses
                assert IPv6Address(got) == IPv6Address(value), (field, row)
            else:
                assert got == value, (field, got, value, kw["msg"])
        cksum = int(row["mip6.csum"], 16)
        assert cksum == struct.unpack_from("!H", pkt, pkt_mh_offset(kw) + 4)[0]
        assert cksum == scapy_checksum(pkt, kw.get("hoa"), kw.get("rh2_hoa"))


def pkt_mh_offset(kw: dict) -> int:
    return 40 + 24 * (("hoa" in kw) + ("rh2_hoa" in kw))


def test_tshark_malformed_check_is_not_vacuous(tmp_path):
    """Control: the same checks do see a Header Len that runs past the packet."""
    pkt = bytearray(push_mh_packet(BindingUpdate(1), HOA, HA))
    pkt[41] = 9  # MH Header Len 9 -> 80 octets, only 16 present
    pcap = tmp_path / "bad.pcap"
    write_pcap(pcap, [bytes(pkt)])
    (row,) = tshark_fields(pcap, ["_ws.malformed", "_ws.expert.severity"], tmp_path)
    assert row["_ws.malformed"] != "" and max(int(s) for s in row["_ws.expert.severity"].split(",")) >= PI_WARN
