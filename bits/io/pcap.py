"""Minimal pcap reader/writer (the classic libpcap format, not pcapng).

Reads captures of IP traffic (raw IP, Ethernet, Linux cooked v1, IPv4/IPv6 link types) and yields
the IP packet of every record; writes LINKTYPE_RAW captures that tcpdump and tshark read.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import ParseError

MAGIC_US = 0xA1B2C3D4
MAGIC_NS = 0xA1B23C4D
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
_ETHERTYPE_IP = (0x0800, 0x86DD)
_ETHERTYPE_VLAN = (0x8100, 0x88A8)

_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")


@dataclass(frozen=True, slots=True)
class PcapRecord:
    index: int  # 1-based frame number, as tshark counts
    ts: float
    packet: bytes  # the IP packet (link header removed)


def read_pcap(fh: BinaryIO) -> Iterator[PcapRecord]:
    """Yield the IP packets of a pcap file. Raises ParseError for files that are not pcap."""
    head = fh.read(24)
    if len(head) < 24:
        raise ParseError("not a pcap file (too short)")
    magic_le = struct.unpack("<I", head[:4])[0]
    magic_be = struct.unpack(">I", head[:4])[0]
    if magic_le in (MAGIC_US, MAGIC_NS):
        endian, magic = "<", magic_le
    elif magic_be in (MAGIC_US, MAGIC_NS):
        endian, magic = ">", magic_be
    else:
        raise ParseError("not a pcap file (bad magic; pcapng is not supported, convert with editcap -F pcap)")
    linktype = struct.unpack(endian + "I", head[20:24])[0] & 0x0FFFFFFF
    record = struct.Struct(endian + "IIII")
    frac = 1e-9 if magic == MAGIC_NS else 1e-6
    index = 0
    while True:
        rh = fh.read(16)
        if not rh:
            return
        if len(rh) < 16:
            raise ParseError(f"truncated pcap record header after frame {index}")
        sec, sub, incl, _orig = record.unpack(rh)
        data = fh.read(incl)
        if len(data) < incl:
            raise ParseError(f"truncated pcap record {index + 1}")
        index += 1
        yield PcapRecord(index, sec + sub * frac, strip_link_header(linktype, data))


def strip_link_header(linktype: int, data: bytes) -> bytes:
    if linktype in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6, 12, 14):
        return data
    if linktype == LINKTYPE_ETHERNET:
        off = 12
        while len(data) >= off + 2 and struct.unpack_from("!H", data, off)[0] in _ETHERTYPE_VLAN:
            off += 4
        if len(data) < off + 2 or struct.unpack_from("!H", data, off)[0] not in _ETHERTYPE_IP:
            return b""
        return data[off + 2 :]
    if linktype == LINKTYPE_LINUX_SLL:
        if len(data) < 16 or struct.unpack_from("!H", data, 14)[0] not in _ETHERTYPE_IP:
            return b""
        return data[16:]
    raise ParseError(f"unsupported pcap link type {linktype}")


class PcapWriter:
    """Writes LINKTYPE_RAW records (each record one IPv4 or IPv6 packet)."""

    def __init__(self, fh: BinaryIO, snaplen: int = 262144) -> None:
        self._fh = fh
        fh.write(_GLOBAL.pack(MAGIC_US, 2, 4, 0, 0, snaplen, LINKTYPE_RAW))

    def write(self, packet: bytes, ts: float) -> None:
        sec = int(ts)
        usec = int(round((ts - sec) * 1e6))
        if usec >= 1_000_000:
            sec, usec = sec + 1, usec - 1_000_000
        self._fh.write(_RECORD.pack(sec, usec, len(packet), len(packet)))
        self._fh.write(packet)
