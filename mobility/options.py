"""Mobility options (RFC 6275 section 6.2, RFC 5555 section 3): frozen dataclasses and their codec.

Options are TLVs after the fixed part of a Mobility Header message. ``pull_options`` skips Pad1/PadN
and keeps every other option in order; options whose type it does not know become ``UnknownOption``
and are pushed back verbatim (RFC 6275 6.2.1: "quietly ignore and skip", we keep them so that a relay
or a trace loses nothing). ``push_options`` inserts Pad1/PadN so that each option meets its ``xn+y``
alignment (counted from the first octet of the Mobility Header) and the message ends on a multiple
of 8 octets. Padding is never kept in the dataclasses: it is a property of the encoding.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, TypeVar, Union

from .constants import MH_ALIGN, LIFETIME_UNIT, Ipv4AckStatus, OptionType
from .errors import EncodeError, ParseError

IPv4Address = ipaddress.IPv4Address
IPv6Address = ipaddress.IPv6Address

_U16 = struct.Struct("!H")
_U16U16 = struct.Struct("!HH")
_TL = struct.Struct("!BB")  # Option Type, Option Length
_WORD_ADDR4 = struct.Struct("!H4s")  # 16-bit word (prefix/flags/reserved) + IPv4 address
_BYTE_BYTE_ADDR4 = struct.Struct("!BB4s")
_WORD_U32 = struct.Struct("!HI")


def _enum_or_int(enum: type, value: int) -> int:
    """``enum(value)`` when the value is assigned, else the plain int (unknown codes still parse)."""
    try:
        return enum(value)
    except ValueError:
        return int(value)


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # normalising a field of a frozen dataclass


def _expect_len(cls: type, data: bytes, length: int) -> None:
    if len(data) != length:
        raise ParseError(f"{cls.__name__}: option length {len(data)}, expected {length}")


# --- RFC 6275 options ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BindingRefreshAdvice:
    """Binding Refresh Advice (RFC 6275 6.2.4): only in a BA from the HA; must be < BA Lifetime."""

    refresh_interval: int  # in units of 4 seconds, like the BU/BA Lifetime

    TYPE: ClassVar[OptionType] = OptionType.BINDING_REFRESH_ADVICE
    ALIGN: ClassVar[tuple[int, int]] = (2, 0)  # 2n

    @property
    def refresh_seconds(self) -> int:
        return self.refresh_interval * LIFETIME_UNIT

    @classmethod
    def pull_data(cls, data: bytes) -> BindingRefreshAdvice:
        _expect_len(cls, data, 2)
        return cls(_U16.unpack(data)[0])

    def push_data(self) -> bytes:
        return _U16.pack(self.refresh_interval)


@dataclass(frozen=True, slots=True)
class AlternateCareOfAddress:
    """Alternate Care-of Address (RFC 6275 6.2.5): the CoA of a BU, protected by ESP unlike the
    IPv6 source address (mandatory in home registrations, RFC 6275 11.7.1)."""

    coa: IPv6Address

    TYPE: ClassVar[OptionType] = OptionType.ALTERNATE_COA
    ALIGN: ClassVar[tuple[int, int]] = (8, 6)  # 8n+6: the address starts on an 8-octet boundary

    def __post_init__(self) -> None:
        _set(self, "coa", IPv6Address(self.coa))

    @classmethod
    def pull_data(cls, data: bytes) -> AlternateCareOfAddress:
        _expect_len(cls, data, 16)
        return cls(IPv6Address(data))

    def push_data(self) -> bytes:
        return self.coa.packed


@dataclass(frozen=True, slots=True)
class NonceIndices:
    """Nonce Indices (RFC 6275 6.2.6): BU to a correspondent node, with Binding Authorization Data."""

    home_nonce_index: int
    care_of_nonce_index: int

    TYPE: ClassVar[OptionType] = OptionType.NONCE_INDICES
    ALIGN: ClassVar[tuple[int, int]] = (2, 0)  # 2n

    @classmethod
    def pull_data(cls, data: bytes) -> NonceIndices:
        _expect_len(cls, data, 4)
        return cls(*_U16U16.unpack(data))

    def push_data(self) -> bytes:
        return _U16U16.pack(self.home_nonce_index, self.care_of_nonce_index)


@dataclass(frozen=True, slots=True)
class BindingAuthorizationData:
    """Binding Authorization Data (RFC 6275 6.2.7). MUST be the last option, with no padding after
    it; hence the implicit 8n+2 alignment. For return routability the authenticator is 12 octets."""

    authenticator: bytes

    TYPE: ClassVar[OptionType] = OptionType.BINDING_AUTH_DATA
    ALIGN: ClassVar[tuple[int, int]] = (8, 2)  # implicit 8n+2

    def __post_init__(self) -> None:
        _set(self, "authenticator", bytes(self.authenticator))

    @classmethod
    def pull_data(cls, data: bytes) -> BindingAuthorizationData:
        return cls(bytes(data))

    def push_data(self) -> bytes:
        return self.authenticator


# --- RFC 5555 (DSMIPv6) options; all four have Length 6 and 4n alignment -------------------------


@dataclass(frozen=True, slots=True)
class Ipv4HomeAddress:
    """IPv4 Home Address option (RFC 5555 3.1.1), in a BU. ``hoa`` 0.0.0.0 asks the HA to allocate
    one; ``p`` requests a mobile network prefix. ``prefix_len`` is 6 bits; 0 is a protocol error for
    the HA to report, not a parse error."""

    hoa: IPv4Address
    prefix_len: int = 32
    p: bool = False

    TYPE: ClassVar[OptionType] = OptionType.IPV4_HOME_ADDRESS
    ALIGN: ClassVar[tuple[int, int]] = (4, 0)  # 4n

    def __post_init__(self) -> None:
        _set(self, "hoa", IPv4Address(self.hoa))

    @classmethod
    def pull_data(cls, data: bytes) -> Ipv4HomeAddress:
        _expect_len(cls, data, 6)
        word, hoa = _WORD_ADDR4.unpack(data)  # Prefix-len(6) | P(1) | Reserved(9)
        return cls(IPv4Address(hoa), word >> 10, bool(word & 0x0200))

    def push_data(self) -> bytes:
        if not 0 <= self.prefix_len <= 63:
            raise EncodeError(f"IPv4 Home Address prefix_len {self.prefix_len} does not fit 6 bits")
        return _WORD_ADDR4.pack((self.prefix_len << 10) | (0x0200 if self.p else 0), self.hoa.packed)


@dataclass(frozen=True, slots=True)
class Ipv4AddressAck:
    """IPv4 Address Acknowledgement option (RFC 5555 3.2.1), in a BA; present iff the BU carried an
    IPv4 Home Address option. Type 30 (section 8 of the RFC says 29: a typo)."""

    status: int  # Ipv4AckStatus when assigned; 0..127 = success
    prefix_len: int  # 6 bits; 0 on failure
    hoa: IPv4Address

    TYPE: ClassVar[OptionType] = OptionType.IPV4_ADDRESS_ACK
    ALIGN: ClassVar[tuple[int, int]] = (4, 0)  # 4n

    def __post_init__(self) -> None:
        _set(self, "status", _enum_or_int(Ipv4AckStatus, self.status))
        _set(self, "hoa", IPv4Address(self.hoa))

    @property
    def success(self) -> bool:
        return self.status < 128

    @classmethod
    def pull_data(cls, data: bytes) -> Ipv4AddressAck:
        _expect_len(cls, data, 6)
        status, octet, hoa = _BYTE_BYTE_ADDR4.unpack(data)  # Status | Pref-len(6) Res(2) | HoA
        return cls(status, octet >> 2, IPv4Address(hoa))

    def push_data(self) -> bytes:
        if not 0 <= self.prefix_len <= 63:
            raise EncodeError(f"IPv4 Address Ack prefix_len {self.prefix_len} does not fit 6 bits")
        return _BYTE_BYTE_ADDR4.pack(self.status, self.prefix_len << 2, self.hoa.packed)


@dataclass(frozen=True, slots=True)
class NatDetection:
    """NAT Detection option (RFC 5555 3.2.2), in a BA. ``f``: the MN MUST use UDP encapsulation even
    without a NAT. ``refresh_time`` in seconds; 0 = ignore, 0xFFFFFFFF = no keepalives needed."""

    f: bool
    refresh_time: int

    TYPE: ClassVar[OptionType] = OptionType.NAT_DETECTION
    ALIGN: ClassVar[tuple[int, int]] = (4, 0)  # 4n

    @classmethod
    def pull_data(cls, data: bytes) -> NatDetection:
        _expect_len(cls, data, 6)
        word, refresh = _WORD_U32.unpack(data)  # F(1) | Reserved(15) | Refresh time(32)
        return cls(bool(word & 0x8000), refresh)

    def push_data(self) -> bytes:
        return _WORD_U32.pack(0x8000 if self.f else 0, self.refresh_time)


@dataclass(frozen=True, slots=True)
class Ipv4CareOfAddress:
    """IPv4 Care-of Address option (RFC 5555 3.1.2), in a BU sent from an IPv4-only network: the
    address configured on the MN (before any NAT), compared by the HA with the outer source."""

    coa: IPv4Address

    TYPE: ClassVar[OptionType] = OptionType.IPV4_COA
    ALIGN: ClassVar[tuple[int, int]] = (4, 0)  # 4n

    def __post_init__(self) -> None:
        _set(self, "coa", IPv4Address(self.coa))

    @classmethod
    def pull_data(cls, data: bytes) -> Ipv4CareOfAddress:
        _expect_len(cls, data, 6)
        _reserved, coa = _WORD_ADDR4.unpack(data)
        return cls(IPv4Address(coa))

    def push_data(self) -> bytes:
        return _WORD_ADDR4.pack(0, self.coa.packed)


@dataclass(frozen=True, slots=True)
class UnknownOption:
    """An option whose type this codec does not interpret; kept and pushed back verbatim (no
    alignment is known for it, so none is applied)."""

    option_type: int
    data: bytes

    ALIGN: ClassVar[tuple[int, int]] = (1, 0)

    def __post_init__(self) -> None:
        _set(self, "data", bytes(self.data))

    @property
    def TYPE(self) -> int:  # noqa: N802 - same spelling as the class constant of known options
        return self.option_type

    def push_data(self) -> bytes:
        return self.data


MobilityOption = Union[
    BindingRefreshAdvice,
    AlternateCareOfAddress,
    NonceIndices,
    BindingAuthorizationData,
    Ipv4HomeAddress,
    Ipv4AddressAck,
    NatDetection,
    Ipv4CareOfAddress,
    UnknownOption,
]

#: Dispatch table for ``pull_options`` (pyroute2 ``msg_map`` style). Pad1/PadN are handled inline.
OPTION_CLASSES: dict[int, type] = {
    cls.TYPE: cls
    for cls in (
        BindingRefreshAdvice,
        AlternateCareOfAddress,
        NonceIndices,
        BindingAuthorizationData,
        Ipv4HomeAddress,
        Ipv4AddressAck,
        NatDetection,
        Ipv4CareOfAddress,
    )
}

_OptT = TypeVar("_OptT")


def find_option(options: Iterable[object], cls: type[_OptT]) -> _OptT | None:
    """The first option of class ``cls`` in ``options`` (e.g. a message's ``options``), or None."""
    for opt in options:
        if isinstance(opt, cls):
            return opt
    return None


# --- codec ---------------------------------------------------------------------------------------


def pull_options(data: bytes) -> tuple[MobilityOption, ...]:
    """Parse the mobility options area of a message (RFC 6275 6.2.1). Pad1/PadN are skipped.

    Raises ParseError for an option that runs past the end or a known option with a wrong length.
    Alignment is not checked on receive (the RFC places that duty on the sender).
    """
    options: list[MobilityOption] = []
    pos, end = 0, len(data)
    while pos < end:
        otype = data[pos]
        if otype == OptionType.PAD1:
            pos += 1
            continue
        if pos + 2 > end:
            raise ParseError(f"mobility option type {otype} truncated before its Length field")
        olen = data[pos + 1]
        nxt = pos + 2 + olen
        if nxt > end:
            raise ParseError(f"mobility option type {otype} length {olen} runs past the message")
        if otype != OptionType.PADN:
            options.append(pull_option(otype, data[pos + 2 : nxt]))
        pos = nxt
    return tuple(options)


def pull_option(option_type: int, data: bytes) -> MobilityOption:
    """Decode one option's data (after Type and Length) through ``OPTION_CLASSES``."""
    cls = OPTION_CLASSES.get(option_type)
    if cls is None:
        return UnknownOption(option_type, bytes(data))
    return cls.pull_data(data)


def push_padding(n: int) -> bytes:
    """``n`` octets of padding: Pad1 for one octet, else PadN with n-2 zero octets (RFC 6275 6.2.2-3)."""
    if n == 0:
        return b""
    if n == 1:
        return b"\x00"
    return _TL.pack(OptionType.PADN, n - 2) + bytes(n - 2)


def push_option(option: MobilityOption) -> bytes:
    """Type, Length and data of one option, without alignment padding."""
    if isinstance(option, UnknownOption) and option.option_type in (OptionType.PAD1, OptionType.PADN):
        raise EncodeError("padding is added by push_options, it is not an option to carry")
    try:
        data = option.push_data()
        if len(data) > 255:
            raise EncodeError(f"{len(data)} octets of option data exceed 255")
        return _TL.pack(option.TYPE, len(data)) + data
    except (struct.error, EncodeError) as exc:
        raise EncodeError(f"{type(option).__name__}: {exc}") from None


def push_options(options: Iterable[MobilityOption], offset: int) -> bytes:
    """Encode ``options`` starting at ``offset`` octets from the start of the Mobility Header.

    Each option gets the Pad1/PadN it needs for its ``xn+y`` alignment (RFC 6275 6.2.1: pad =
    (y - offset) mod x, the UMIP ``optpad`` rule); the result ends at a multiple of 8. Binding
    Authorization Data must come last and must end the message without trailing padding (6.2.7).
    """
    out = bytearray()
    pos = offset
    options = tuple(options)
    for i, opt in enumerate(options):
        x, y = opt.ALIGN
        pad = push_padding((y - pos) % x)
        encoded = push_option(opt)
        out += pad
        out += encoded
        pos += len(pad) + len(encoded)
        if isinstance(opt, BindingAuthorizationData) and (i != len(options) - 1 or pos % MH_ALIGN):
            raise EncodeError(
                "Binding Authorization Data must be the last option and end the message on an "
                "8-octet boundary (RFC 6275 6.2.7): authenticator length must be 8n+4"
            )
    out += push_padding(-pos % MH_ALIGN)
    return bytes(out)
