"""IPv4 / IPv6 header helpers: just enough parsing for SPD selectors and ESP placement.

Hot path: called once per packet. Only the fields a decision needs are read, with precompiled
structs and slices; nothing else is materialised.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .constants import IpProto
from .errors import ParseError

_V4_FIXED = struct.Struct("!BBHHHBBH4s4s")
_V6_FIXED = struct.Struct("!IHBB16s16s")
_PORTS = struct.Struct("!HH")
_H = struct.Struct("!H")
# Fast paths (see pull_selectors): the fixed header and the first four octets after it, read in
# one call. IPv4: version/IHL, Total Length, flags/Fragment Offset, Protocol, addresses as ints.
# IPv6: Payload Length, Next Header, addresses.
_unpack_v4_quick = struct.Struct("!BxHxxHxBxxIIHH").unpack_from
_unpack_v6_quick = struct.Struct("!4xHBx16s16sHH").unpack_from
_unpack_v4_esp = struct.Struct("!BxHxxHxBxxIIII").unpack_from
_unpack_v6_esp = struct.Struct("!4xHBx16s16sII").unpack_from
_tuple_new = tuple.__new__
_from_bytes = int.from_bytes

_HOPOPT, _ROUTING, _FRAGMENT, _DSTOPTS = 0, 43, 44, 60
_TCP, _UDP, _SCTP, _UDPLITE = 6, 17, 132, 136
_ICMP, _ICMPV6, _MH = 1, 58, 135
_HOME_ADDRESS_OPTION = 201  # RFC 6275 section 6.3
_PORT_PROTOS = frozenset({_TCP, _UDP, _SCTP, _UDPLITE})
_V6_EXTENSIONS = frozenset({_HOPOPT, _ROUTING, _FRAGMENT, _DSTOPTS})
_ESP = 50


class PacketSelectors(NamedTuple):
    """The selector values of one packet (RFC 4301 section 4.4.1.1), addresses as ints."""

    version: int
    src: int
    dst: int
    proto: int
    sport: int | None = None
    dport: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    mh_type: int | None = None


class IpInfo(NamedTuple):
    """Where things are in one IP packet (offsets into the packet bytes)."""

    version: int
    header_len: int  # fixed header: IPv4 IHL*4, IPv6 40
    src: bytes
    dst: bytes
    proto: int  # final next-layer protocol, after IPv6 extension headers
    l4_offset: int  # where that next-layer header starts
    esp_offset: int  # where transport-mode ESP goes (RFC 4303 section 3.1.1)
    nh_offset: int  # byte holding the Next Header value of the header at esp_offset
    fragment: bool  # a fragment (IPv4 MF/offset, IPv6 fragment header): ports may be absent


def pull_ip(packet: bytes) -> IpInfo:
    """Parse the IP header chain of ``packet``. Raises ParseError on truncated or bad headers."""
    if not packet:
        raise ParseError("empty packet")
    version = packet[0] >> 4
    if version == 4:
        return _pull_ipv4(packet)
    if version == 6:
        return _pull_ipv6(packet)
    raise ParseError(f"IP version {version}")


def _pull_ipv4(packet: bytes) -> IpInfo:
    if len(packet) < 20:
        raise ParseError("truncated IPv4 header")
    vihl, _tos, total, _id, frag, _ttl, proto, _sum, src, dst = _V4_FIXED.unpack_from(packet)
    ihl = (vihl & 0x0F) * 4
    if ihl < 20 or ihl > len(packet) or total < ihl or total > len(packet):
        raise ParseError("bad IPv4 header or total length")
    fragment = (frag & 0x3FFF) != 0  # MF set or offset non-zero
    return IpInfo(4, ihl, src, dst, proto, ihl, ihl, 9, fragment)


def _pull_ipv6(packet: bytes) -> IpInfo:
    """Walk the extension header chain (RFC 8200 section 4) to the upper layer.

    ESP goes after hop-by-hop, routing and fragment headers, and after a destination options header
    that precedes a routing header or carries the Home Address option (RFC 6275 section 6.3 places
    it before ESP so the receiver can swap addresses before IPsec). Other destination options
    headers follow ESP (RFC 4303 section 3.1.1) and so are encrypted.
    """
    n = len(packet)
    if n < 40:
        raise ParseError("truncated IPv6 header")
    _vtf, plen, nh, _hlim, src, dst = _V6_FIXED.unpack_from(packet)
    if 40 + plen > n:
        raise ParseError("IPv6 payload length beyond packet")
    off, nh_off = 40, 6
    esp_off, esp_nh_off = -1, -1
    fragment = False
    while nh in (_HOPOPT, _ROUTING, _FRAGMENT, _DSTOPTS):
        if off + 8 > n:
            raise ParseError("truncated IPv6 extension header")
        hlen = 8 if nh == _FRAGMENT else (packet[off + 1] + 1) * 8
        if off + hlen > n:
            raise ParseError("truncated IPv6 extension header")
        if nh == _FRAGMENT:
            fragment = True
            if _H.unpack_from(packet, off + 2)[0] & 0xFFF8:
                # non-first fragment: what follows is not a header
                if esp_off < 0:
                    esp_off, esp_nh_off = off + 8, off
                return IpInfo(6, 40, src, dst, _FRAGMENT, off + 8, esp_off, esp_nh_off, True)
        if nh == _DSTOPTS and esp_off < 0 and not _dstopts_before_esp(packet, off, hlen):
            esp_off, esp_nh_off = off, nh_off
        nh_off = off
        nh = packet[off]
        off += hlen
    if esp_off < 0:
        esp_off, esp_nh_off = off, nh_off
    return IpInfo(6, 40, src, dst, nh, off, esp_off, esp_nh_off, fragment)


def _dstopts_before_esp(packet: bytes, off: int, hlen: int) -> bool:
    """A destination options header stays in front of ESP when a routing header follows it or it
    carries the Home Address option."""
    if packet[off] == _ROUTING:
        return True
    i, end = off + 2, off + hlen
    while i < end:
        opt = packet[i]
        if opt == 0:  # Pad1
            i += 1
            continue
        if i + 1 >= end:
            raise ParseError("truncated IPv6 option")
        if opt == _HOME_ADDRESS_OPTION:
            return True
        i += 2 + packet[i + 1]
    return False


def pull_selectors(packet: bytes) -> PacketSelectors:
    """Selector values of ``packet`` for an SPD lookup. Raises ParseError.

    Hot path. IPv4 without options that is not a non-initial fragment, and IPv6 whose Next Header
    is not an extension header, are read with one ``unpack_from`` (the answer is the one
    ``selectors_from_info(packet, pull_ip(packet))`` gives, which handles everything else)."""
    n = len(packet)
    if n >= 24 and packet[0] == 0x45:
        _, total, frag, proto, src, dst, w1, w2 = _unpack_v4_quick(packet)
        if 20 <= total <= n and not frag & 0x1FFF:
            if proto in _PORT_PROTOS:
                return _tuple_new(PacketSelectors, (4, src, dst, proto, w1, w2, None, None, None))
            return _quick_selectors(4, src, dst, proto, w1, w2)
    elif n >= 44 and packet[0] >> 4 == 6:
        plen, nh, src, dst, w1, w2 = _unpack_v6_quick(packet)
        if 40 + plen <= n and nh not in _V6_EXTENSIONS:
            src, dst = _from_bytes(src, "big"), _from_bytes(dst, "big")
            if nh in _PORT_PROTOS:
                return _tuple_new(PacketSelectors, (6, src, dst, nh, w1, w2, None, None, None))
            return _quick_selectors(6, src, dst, nh, w1, w2)
    info = pull_ip(packet)
    return selectors_from_info(packet, info)


def _quick_selectors(version: int, src: int, dst: int, proto: int, w1: int, w2: int) -> PacketSelectors:
    """The fast paths' selectors for a protocol without ports; ``w1``, ``w2``: the first four
    octets of the next-layer header (the packet is long enough for each of them)."""
    if proto == _ICMP or proto == _ICMPV6:
        return _tuple_new(PacketSelectors, (version, src, dst, proto, None, None, w1 >> 8, w1 & 0xFF, None))
    if proto == _MH:
        return _tuple_new(PacketSelectors, (version, src, dst, proto, None, None, None, None, w2 >> 8))
    return _tuple_new(PacketSelectors, (version, src, dst, proto, None, None, None, None, None))


def pull_esp_quick(packet: bytes) -> tuple[int, int, int, int] | None:
    """``(esp_offset, destination as int, SPI, sequence number)`` when ``packet`` is IPv4 without
    options or IPv6 without extension headers, carries ESP and holds the whole ESP header; None
    otherwise (then ``pull_ip`` decides). Hot path of inbound processing; what it accepts,
    ``pull_ip`` parses the same way (``l4_offset``, ``dst``) and without error."""
    n = len(packet)
    if n >= 28 and packet[0] == 0x45:
        _, total, _frag, proto, _src, dst, spi, seq = _unpack_v4_esp(packet)
        if proto == _ESP and 20 <= total <= n:
            return 20, dst, spi, seq
    elif n >= 48 and packet[0] >> 4 == 6:
        plen, nh, _src, dst, spi, seq = _unpack_v6_esp(packet)
        if nh == _ESP and 40 + plen <= n:
            return 40, _from_bytes(dst, "big"), spi, seq
    return None


def selectors_from_info(packet: bytes, info: IpInfo) -> PacketSelectors:
    src = int.from_bytes(info.src, "big")
    dst = int.from_bytes(info.dst, "big")
    proto, off = info.proto, info.l4_offset
    if info.fragment and (info.version == 6 and proto == _FRAGMENT or _non_first_v4(packet, info)):
        # RFC 4301 section 4.4.1.1: port selectors of a non-initial fragment are OPAQUE
        return PacketSelectors(info.version, src, dst, proto)
    if proto in _PORT_PROTOS:
        if len(packet) < off + 4:
            raise ParseError("truncated transport header")
        sport, dport = _PORTS.unpack_from(packet, off)
        return PacketSelectors(info.version, src, dst, proto, sport, dport)
    if proto == _ICMP or proto == _ICMPV6:
        if len(packet) < off + 2:
            raise ParseError("truncated ICMP header")
        return PacketSelectors(info.version, src, dst, proto, None, None, packet[off], packet[off + 1])
    if proto == _MH:
        if len(packet) < off + 3:
            raise ParseError("truncated Mobility Header")
        return PacketSelectors(info.version, src, dst, proto, None, None, None, None, packet[off + 2])
    return PacketSelectors(info.version, src, dst, proto)


def _non_first_v4(packet: bytes, info: IpInfo) -> bool:
    return info.version == 4 and (_H.unpack_from(packet, 6)[0] & 0x1FFF) != 0


# --- building ----------------------------------------------------------------------------------


def ipv4_checksum(header: bytes) -> int:
    """RFC 791 header checksum (one's complement sum of 16-bit words)."""
    if len(header) % 2:
        header = header + b"\x00"
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def push_ipv4_header(
    src: bytes,
    dst: bytes,
    proto: int,
    total_len: int,
    ttl: int = 64,
    tos: int = 0,
    ident: int = 0,
    df: bool = False,
) -> bytes:
    """A 20-octet IPv4 header with its checksum."""
    frag = 0x4000 if df else 0
    hdr = _V4_FIXED.pack(0x45, tos, total_len, ident, frag, ttl, proto, 0, src, dst)
    return hdr[:10] + _H.pack(ipv4_checksum(hdr)) + hdr[12:]


def push_ipv6_header(
    src: bytes,
    dst: bytes,
    next_header: int,
    payload_len: int,
    hop_limit: int = 64,
    traffic_class: int = 0,
    flow_label: int = 0,
) -> bytes:
    """A 40-octet IPv6 header."""
    vtf = (6 << 28) | (traffic_class << 20) | (flow_label & 0xFFFFF)
    return _V6_FIXED.pack(vtf, payload_len, next_header, hop_limit, src, dst)


def fix_ipv4_header(buf: bytearray) -> None:
    """Recompute the checksum of the IPv4 header at the start of ``buf`` in place."""
    ihl = (buf[0] & 0x0F) * 4
    buf[10:12] = b"\x00\x00"
    buf[10:12] = _H.pack(ipv4_checksum(bytes(buf[:ihl])))


def set_payload_length(buf: bytearray) -> None:
    """Set IPv4 Total Length (and checksum) or IPv6 Payload Length from len(buf)."""
    if buf[0] >> 4 == 4:
        buf[2:4] = _H.pack(len(buf))
        fix_ipv4_header(buf)
    else:
        buf[4:6] = _H.pack(len(buf) - 40)


__all__ = [
    "IpInfo",
    "IpProto",
    "PacketSelectors",
    "fix_ipv4_header",
    "ipv4_checksum",
    "pull_esp_quick",
    "pull_ip",
    "pull_selectors",
    "push_ipv4_header",
    "push_ipv6_header",
    "selectors_from_info",
    "set_payload_length",
]
