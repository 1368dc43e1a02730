"""tshark 4.0 (an independent dissector and ESP decryptor) reads our DSMIPv6 packets as they are on
the HA's IPv4 link: BU and BA in UDP port 4191 (``-d udp.port==4191,ipv6``), decrypted with the
SAs, the IPv4 Care-of Address, IPv4 Home Address, IPv4 Address Acknowledgement and NAT Detection
options and the F flag with the values our cores chose; data in UDP and in IPv6-in-IPv4
(protocol 41). The packets come from ``tests.test_dsmipv6.World`` (two real engines, the tunnel
modules, the BUL and the binding cache); the IPv4/UDP headers are what the sockets would add."""

from __future__ import annotations

import os
import shutil
import subprocess
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from bits.io.pcap import PcapWriter
from tests.test_dsmipv6 import HA, HA4, HOA, MN_PORT, NAT_PUB, PRIV, PUB, SPI_BA, SPI_BU, SPI_HA_DATA, World

pytestmark = pytest.mark.tshark

FIELDS = [
    "ip.src", "ip.dst", "ip.proto", "udp.srcport", "udp.dstport", "ipv6.src", "ipv6.dst", "esp.spi",
    "esp.icv_good", "mip6.mhtype", "mip6.bu.f_flag", "mip6.ipv4coa.addr", "mip6.ipv4ha.ha",
    "mip6.ipv4aa.sts", "mip6.natd.f_flag", "mip6.natd.refresh_t", "mip6.ba.status", "icmpv6.type",
]
GCM = "AES-GCM with 16 octet ICV [RFC4106]"


def _uat(spi: int, key: int) -> str:
    return f'uat:esp_sa:"IPv6","*","*","{spi:#010x}","{GCM}","0x{f"{key:02x}" * 20}","NULL",""'


def dissect(frames: list[bytes], tmp: Path) -> list[dict[str, str]]:
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.fail("tshark missing (deselect with -m 'not tshark')")
    pcap = tmp / "dsmipv6.pcap"
    with pcap.open("wb") as fh:
        writer = PcapWriter(fh)
        for i, frame in enumerate(frames):
            writer.write(frame, 1.0 + i / 100)
    cmd = [tshark, "-n", "-r", str(pcap), "-d", "udp.port==4191,ipv6",
           "-o", "esp.enable_encryption_decode:TRUE", "-o", "esp.enable_authentication_check:TRUE",
           "-T", "fields", "-E", "separator=/t", "-E", "occurrence=a"]
    for spi, key in ((0x1001, 1), (0x1002, 2), (0x1007, 7), (0x1008, 8)):
        cmd += ["-o", _uat(spi, key)]
    for field in FIELDS:
        cmd += ["-e", field]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False,
                          env=dict(os.environ, HOME=str(tmp)))
    assert done.returncode == 0, done.stderr
    return [dict(zip(FIELDS, line.split("\t"), strict=True)) for line in done.stdout.splitlines()]


def has(row: dict[str, str], field: str, value: str) -> bool:
    return value in row[field].split(",")


def test_nat_then_public_ipv4_as_tshark_sees_it(tmp_path):
    w = World("api", mn_kw={"ipv4_hoa": IPv4Address(0)}, ha_kw={"ipv4_pool": ("10.1.0.10",)})
    w.move(PRIV)
    assert w.cn_ping(1)
    w.now = 5.0
    w.move(PUB)
    assert w.cn_ping(2)
    rows = dissect(w.frames, tmp_path)
    assert len(rows) == 6
    bu1, ba1, data1, bu2, ba2, data2 = rows

    # the BU behind the NAT: outer source = the NAT's address, IPv4 CoA option = the private one
    assert (bu1["ip.src"], bu1["ip.dst"], bu1["udp.dstport"]) == (NAT_PUB, HA4, "4191")
    assert (bu1["ipv6.src"], bu1["ipv6.dst"]) == (HOA, HA)  # no Home Address option, HoA as source
    assert int(bu1["esp.spi"], 0) == SPI_BU and bu1["esp.icv_good"] == "1" and bu1["mip6.mhtype"] == "5"
    assert bu1["mip6.ipv4coa.addr"] == PRIV and bu1["mip6.ipv4ha.ha"] == "0.0.0.0" and bu1["mip6.bu.f_flag"] == "0"
    # its BA: UDP from 4191 back to the NAT's port, NAT detected (refresh 110 s), IPv4 HoA assigned
    assert (ba1["ip.src"], ba1["ip.dst"], ba1["udp.srcport"], ba1["udp.dstport"]) == (HA4, NAT_PUB, "4191", "50000")
    assert (ba1["ipv6.src"], ba1["ipv6.dst"]) == (HA, HOA)
    assert int(ba1["esp.spi"], 0) == SPI_BA and ba1["esp.icv_good"] == "1" and ba1["mip6.mhtype"] == "6"
    assert ba1["mip6.ba.status"] == "0" and ba1["mip6.ipv4aa.sts"] == "0" and has(ba1, "mip6.ipv4ha.ha", "10.1.0.10")
    assert (ba1["mip6.natd.f_flag"], ba1["mip6.natd.refresh_t"]) == ("0", "110")
    # data to the recorded address and port, decrypted: an echo request inside
    assert (data1["ip.dst"], data1["udp.dstport"]) == (NAT_PUB, "50000") and int(data1["esp.spi"], 0) == SPI_HA_DATA
    assert data1["esp.icv_good"] == "1" and data1["icmpv6.type"] == "128"

    # the public network: no NAT -> refresh all ones, F clear, data as IPv6-in-IPv4
    assert (bu2["ip.src"], bu2["udp.srcport"], bu2["mip6.ipv4coa.addr"]) == (PUB, str(MN_PORT), PUB)
    assert bu2["mip6.ipv4ha.ha"] == "10.1.0.10"  # the assigned address is asked for from now on
    assert (ba2["ip.dst"], ba2["udp.dstport"]) == (PUB, str(MN_PORT))
    assert (ba2["mip6.natd.f_flag"], ba2["mip6.natd.refresh_t"]) == ("0", str(0xFFFFFFFF))
    assert data2["ip.proto"] == "41" and data2["udp.dstport"] == "" and data2["ip.dst"] == PUB
    assert int(data2["esp.spi"], 0) == SPI_HA_DATA and data2["icmpv6.type"] == "128"


def test_forced_udp_without_nat_as_tshark_sees_it(tmp_path):
    w = World("heuristic", mn_kw={"force_udp": True})
    w.move(PUB)
    assert w.cn_ping(1)
    bu, ba, data = dissect(w.frames, tmp_path)
    assert bu["mip6.bu.f_flag"] == "1" and bu["mip6.ipv4coa.addr"] == PUB
    assert (ba["mip6.natd.f_flag"], ba["mip6.natd.refresh_t"]) == ("1", str(0xFFFFFFFF))
    assert data["ip.proto"] == "17" and data["udp.dstport"] == str(MN_PORT) and data["icmpv6.type"] == "128"
