"""IPv6 extension headers of Mobile IPv6 (RFC 6275 6.3, 6.4) and the Mobility Header's place in a packet.

* Home Address destination option (type 201, 8n+6) in a Destination Options header (Next Header 60):
  the MN puts its home address there when it sends a BU from a care-of address.
* Type 2 routing header (Next Header 43, Routing Type 2, one address, Segments Left 1): the HA puts
  the MN's home address there when it sends the BA to the care-of address.
* ``locate_mh`` walks an IPv6 packet's header chain to the cleartext Mobility Header and reports the
  addresses the MH checksum pseudo-header must use (home address from the option as source, home
  address from the routing header as destination); ``push_mh_packet`` / ``pull_mh_packet`` build and
  read whole IPv6 packets with those rules applied.

Sans-I/O, bytes in and out. Malformed input raises ``mobility.errors.ParseError``.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from bits.constants import IpProto

from .constants import HAO_DATA_LEN, HAO_OPTION_TYPE, IPPROTO_MH, ROUTING_TYPE_2
from .errors import EncodeError, ParseError
from .mh import MobilityMessage, UnknownMessage, pull_mh, push_mh, verify_checksum

IPv6Address = ipaddress.IPv6Address

_IPV6 = struct.Struct("!IHBB16s16s")  # version/class/flow, Payload Length, Next Header, Hop Limit
IPV6_HEADER_LEN = _IPV6.size  # 40
_EXT = struct.Struct("!BB")  # Next Header, Hdr Ext Len (8-octet units, not counting the first 8)
_RH2 = struct.Struct("!BBBB4x16s")  # Next Header, Hdr Ext Len, Routing Type, Segments Left, HoA
RH2_LEN = _RH2.size  # 24
_FRAG_OFFSET = struct.Struct("!H")
HAO_HEADER_LEN = 24  # NH, Len, PadN(4), Type, Len, HoA(16) (RFC 6275 6.3, 3776 7.1)
_HAO_PAD = b"\x01\x02\x00\x00"  # PadN with two zero octets: puts the option Type at 8n+6


# --- Home Address destination option (RFC 6275 6.3) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class DestinationOptions:
    """What Mobile IPv6 needs from a Destination Options header: where it leads and the home
    address of its Home Address option (None when it has none). Other options are skipped."""

    next_header: int
    hoa: IPv6Address | None
    length: int  # octets of the whole header


def push_home_address_option(hoa: IPv6Address | bytes | str, next_header: int = IPPROTO_MH) -> bytes:
    """A 24-octet Destination Options header holding only the Home Address option, 8n+6 aligned:
    ``NH | 2 | PadN 01 02 00 00 | C9 10 | HoA``."""
    return _EXT.pack(next_header, 2) + _HAO_PAD + _EXT.pack(HAO_OPTION_TYPE, HAO_DATA_LEN) + _packed(hoa)


def pull_destination_options(data: bytes) -> DestinationOptions:
    """Parse the Destination Options header at the start of ``data`` (which may continue with the
    rest of the packet). At most one Home Address option is allowed (RFC 6275 6.3)."""
    length = _ext_len(data)
    hoa: IPv6Address | None = None
    pos = 2
    while pos < length:
        otype = data[pos]
        if otype == 0:  # Pad1
            pos += 1
            continue
        if pos + 2 > length or pos + 2 + data[pos + 1] > length:
            raise ParseError("destination option runs past its header")
        olen = data[pos + 1]
        if otype == HAO_OPTION_TYPE:
            if hoa is not None or olen != HAO_DATA_LEN:
                raise ParseError("duplicate Home Address option or its length is not 16")
            hoa = IPv6Address(bytes(data[pos + 2 : pos + 18]))
        pos += 2 + olen
    return DestinationOptions(data[0], hoa, length)


# --- Type 2 routing header (RFC 6275 6.4) --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Type2RoutingHeader:
    """Type 2 routing header: one home address. ``segments_left`` is 1 as sent; 0 once the MN has
    processed it (RFC 6275 6.4.1, 11.3.3)."""

    next_header: int
    hoa: IPv6Address
    segments_left: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "hoa", IPv6Address(self.hoa))


def push_type2_routing_header(
    hoa: IPv6Address | bytes | str, next_header: int = IPPROTO_MH, segments_left: int = 1
) -> bytes:
    """The 24-octet type 2 routing header: ``NH | 2 | 2 | SL | reserved(4) | HoA``."""
    if segments_left not in (0, 1):
        raise EncodeError("a type 2 routing header has Segments Left 1 (or 0 once processed)")
    return _RH2.pack(next_header, 2, ROUTING_TYPE_2, segments_left, _packed(hoa))


def pull_type2_routing_header(data: bytes) -> Type2RoutingHeader:
    """Parse a type 2 routing header at the start of ``data``. Hdr Ext Len must be 2, Routing Type
    2 and Segments Left 0 or 1 (RFC 6275 6.4.1, 9.3.2/11.3.3: anything else is discarded)."""
    if len(data) < RH2_LEN:
        raise ParseError("type 2 routing header truncated")
    next_header, hdr_len, rtype, segments_left, hoa = _RH2.unpack_from(data)
    if rtype != ROUTING_TYPE_2:
        raise ParseError(f"routing type {rtype}, expected 2")
    if hdr_len != 2 or segments_left > 1:
        raise ParseError(f"type 2 routing header with Hdr Ext Len {hdr_len}, Segments Left {segments_left}")
    return Type2RoutingHeader(next_header, IPv6Address(hoa), segments_left)


# --- where the Mobility Header is -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MhLocation:
    """A cleartext Mobility Header found in an IPv6 packet.

    ``offset``/``length``: the MH is ``packet[offset:offset + length]``. ``src``/``dst``: the IPv6
    header's addresses. ``hoa``: from a Home Address option; ``rh2_hoa``: from a type 2 routing header
    with Segments Left 1. ``pseudo_src``/``pseudo_dst``: the checksum pseudo-header addresses
    (RFC 6275 6.1.1, RFC 8200 8.1), also the upper-layer view of the packet's endpoints.
    """

    offset: int
    length: int
    mh_type: int
    src: IPv6Address
    dst: IPv6Address
    hoa: IPv6Address | None = None
    rh2_hoa: IPv6Address | None = None

    @property
    def pseudo_src(self) -> IPv6Address:
        return self.hoa if self.hoa is not None else self.src

    @property
    def pseudo_dst(self) -> IPv6Address:
        return self.rh2_hoa if self.rh2_hoa is not None else self.dst


def locate_mh(packet: bytes) -> MhLocation | None:
    """Walk the IPv6 header chain of ``packet`` (RFC 8200 4) to a cleartext Mobility Header.

    Returns None when the chain ends in anything else (ESP, TCP, ... or a fragment, whose MH cannot
    be read without reassembly). Raises ParseError for a truncated or malformed chain.
    """
    if len(packet) < IPV6_HEADER_LEN or packet[0] >> 4 != 6:
        raise ParseError("not an IPv6 packet or truncated IPv6 header")
    _vtf, plen, nh, _hlim, src, dst = _IPV6.unpack_from(packet)
    end = IPV6_HEADER_LEN + plen
    if end > len(packet):
        raise ParseError("IPv6 Payload Length beyond the packet")
    packet = packet[:end]
    off, hoa, rh2_hoa = IPV6_HEADER_LEN, None, None
    while nh != IPPROTO_MH:
        if nh in (IpProto.HOPOPT, IpProto.DSTOPTS):
            opts = pull_destination_options(packet[off:])  # same TLV layout (RFC 8200 4.3, 4.6)
            if nh == IpProto.DSTOPTS and opts.hoa is not None:
                if hoa is not None:
                    raise ParseError("more than one Home Address option")
                hoa = opts.hoa
            nh, off = opts.next_header, off + opts.length
        elif nh == IpProto.ROUTING:
            length = _ext_len(packet[off:])
            if packet[off + 2] == ROUTING_TYPE_2:
                rh2 = pull_type2_routing_header(packet[off:])
                rh2_hoa = rh2.hoa if rh2.segments_left else rh2_hoa
            nh, off = packet[off], off + length
        else:  # fragment, ESP, an upper layer, No Next Header
            return None
    return _mh_location(packet, off, src, dst, hoa, rh2_hoa)


def _mh_location(
    packet: bytes, off: int, src: bytes, dst: bytes, hoa: IPv6Address | None, rh2_hoa: IPv6Address | None
) -> MhLocation:
    if off + 8 > len(packet):
        raise ParseError("Mobility Header truncated")
    length = (packet[off + 1] + 1) * 8
    if off + length > len(packet):
        raise ParseError("Mobility Header Len beyond the IPv6 payload")
    return MhLocation(off, length, packet[off + 2], IPv6Address(src), IPv6Address(dst), hoa, rh2_hoa)


def pull_mh_packet(packet: bytes, verify: bool = True) -> tuple[MhLocation, MobilityMessage | UnknownMessage] | None:
    """Locate and decode the cleartext MH of an IPv6 packet; None when there is none.

    With ``verify`` a wrong checksum raises ParseError (RFC 6275 9.2: silently discard).
    """
    loc = locate_mh(packet)
    if loc is None:
        return None
    mh = bytes(packet[loc.offset : loc.offset + loc.length])
    if verify and not verify_checksum(mh, loc.pseudo_src, loc.pseudo_dst):
        raise ParseError("Mobility Header checksum mismatch")
    return loc, pull_mh(mh)


def push_mh_packet(
    msg: MobilityMessage | UnknownMessage,
    src: IPv6Address | bytes | str,
    dst: IPv6Address | bytes | str,
    *,
    hoa: IPv6Address | bytes | str | None = None,
    rh2_hoa: IPv6Address | bytes | str | None = None,
    hop_limit: int = 64,
) -> bytes:
    """A whole IPv6 packet: header (``src`` -> ``dst``), [type 2 routing header with ``rh2_hoa``],
    [Destination Options with the Home Address option ``hoa``], Mobility Header. The checksum uses
    ``hoa`` / ``rh2_hoa`` in the pseudo-header as RFC 6275 6.1.1 says. RFC 6275 6.1 allows the
    option only on a BU and the routing header only on a BA; enforcing that is the caller's job.
    """
    pseudo_src = _packed(hoa if hoa is not None else src)
    pseudo_dst = _packed(rh2_hoa if rh2_hoa is not None else dst)
    payload = push_mh(msg, pseudo_src, pseudo_dst)
    nh = IPPROTO_MH
    if hoa is not None:  # RFC 8200 4.1 order: routing header, then destination options
        payload = push_home_address_option(hoa, nh) + payload
        nh = IpProto.DSTOPTS
    if rh2_hoa is not None:
        payload = push_type2_routing_header(rh2_hoa, nh) + payload
        nh = IpProto.ROUTING
    header = _IPV6.pack(6 << 28, len(payload), nh, hop_limit, _packed(src), _packed(dst))
    return header + payload


# --- helpers -------------------------------------------------------------------------------------


def _ext_len(data: bytes) -> int:
    """Length in octets of the extension header at the start of ``data`` (RFC 8200 4.3)."""
    if len(data) < 8:
        raise ParseError("IPv6 extension header truncated")
    length = (data[1] + 1) * 8
    if length > len(data):
        raise ParseError("IPv6 extension header runs past the packet")
    return length


def _packed(addr: IPv6Address | bytes | str) -> bytes:
    try:
        return IPv6Address(addr).packed
    except ValueError as exc:
        raise EncodeError(str(exc)) from None
