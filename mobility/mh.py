"""Mobility Header messages (RFC 6275 section 6.1, RFC 5555 3.1.3): frozen dataclasses and codec.

Sans-I/O: bytes in, dataclasses out, and back. ``pull_mh(data)`` takes exactly one Mobility Header
(the IPv6 payload starting at the MH, see ``mobility.ipv6ext.locate_mh``) and returns a message;
``push_mh(msg, src, dst)`` returns the MH octets with the checksum filled.

Checksum addresses (RFC 6275 6.1.1, 11.3.1): the pseudo-header uses the addresses the *upper layer*
sees, which are not always those in the IPv6 header:

* the packet carries a Home Address destination option (a BU sent from a CoA) -> ``src`` is the
  **home address** from that option, not the CoA in the IPv6 source field;
* the packet carries a type 2 routing header (a BA sent to a CoA) -> ``dst`` is the **home address**
  inside the routing header (the final destination), not the CoA in the IPv6 destination field;
* otherwise the IPv6 source and destination.

So a home registration BU is pushed with ``src=HoA, dst=HA`` and its BA with ``src=HA, dst=HoA``,
wherever the MN is. ``verify_checksum`` takes the same pair.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import ClassVar, Union

from .constants import (
    BA_FLAGS_KNOWN,
    BU_FLAGS_KNOWN,
    IPPROTO_MH,
    IPPROTO_NONE,
    LIFETIME_UNIT,
    MAX_LIFETIME_UNITS,
    MH_ALIGN,
    BaFlag,
    BaStatus,
    BeStatus,
    BuFlag,
    MhType,
)
from .errors import EncodeError, ParseError
from .options import MobilityOption, _enum_or_int, _set, pull_options, push_options

IPv6Address = ipaddress.IPv6Address

_HDR = struct.Struct("!BBBBH")  # Payload Proto, Header Len, MH Type, Reserved, Checksum
HDR_LEN = _HDR.size  # 6: message data starts here
_RESERVED16 = struct.Struct("!H")
_INIT = struct.Struct("!H8s")  # Reserved, Init Cookie (HoTI, CoTI)
_TEST = struct.Struct("!H8s8s")  # Nonce Index, Init Cookie, Keygen Token (HoT, CoT)
_BU = struct.Struct("!HHH")  # Sequence #, Flags, Lifetime
_BA = struct.Struct("!BBHH")  # Status, Flags, Sequence #, Lifetime
_BE = struct.Struct("!BB16s")  # Status, Reserved, Home Address
_PSEUDO = struct.Struct("!16s16sI3xB")  # RFC 2460 8.1 upper-layer pseudo-header


def lifetime_units(seconds: float) -> int:
    """Seconds -> BU/BA Lifetime units of 4 s (RFC 6275 6.1.7), rounded down so that a granted
    lifetime never exceeds the one asked for, clamped to the 16-bit field."""
    return max(0, min(int(seconds // LIFETIME_UNIT), MAX_LIFETIME_UNITS))


def lifetime_seconds(units: int) -> int:
    """BU/BA Lifetime or Refresh Interval units -> seconds."""
    return units * LIFETIME_UNIT


def _options_tuple(obj: object) -> None:
    _set(obj, "options", tuple(obj.options))  # type: ignore[attr-defined]


def _check_len(cls: type, value: bytes, length: int, field: str) -> None:
    if len(value) != length:
        raise EncodeError(f"{cls.__name__}.{field} must be {length} octets, got {len(value)}")


# --- messages ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BindingRefreshRequest:
    """Binding Refresh Request, MH type 0 (RFC 6275 6.1.2)."""

    options: tuple[MobilityOption, ...] = ()

    MH_TYPE: ClassVar[MhType] = MhType.BRR
    FIXED_LEN: ClassVar[int] = 2

    def __post_init__(self) -> None:
        _options_tuple(self)

    @classmethod
    def pull_fixed(cls, data: bytes, options: tuple) -> BindingRefreshRequest:
        return cls(options)

    def push_fixed(self) -> bytes:
        return _RESERVED16.pack(0)


@dataclass(frozen=True, slots=True)
class HomeTestInit:
    """Home Test Init, MH type 1 (RFC 6275 6.1.3). Codec only: no route optimisation here."""

    home_init_cookie: bytes  # 8 octets
    options: tuple[MobilityOption, ...] = ()

    MH_TYPE: ClassVar[MhType] = MhType.HOTI
    FIXED_LEN: ClassVar[int] = _INIT.size

    def __post_init__(self) -> None:
        _set(self, "home_init_cookie", bytes(self.home_init_cookie))
        _options_tuple(self)

    @classmethod
    def pull_fixed(cls, data: bytes, options: tuple) -> HomeTestInit:
        _reserved, cookie = _INIT.unpack(data)
        return cls(cookie, options)

    def push_fixed(self) -> bytes:
        _check_len(type(self), self.home_init_cookie, 8, "home_init_cookie")
        return _INIT.pack(0, self.home_init_cookie)


@dataclass(frozen=True, slots=True)
class CareOfTestInit:
    """Care-of Test Init, MH type 2 (RFC 6275 6.1.4). Codec only."""

    care_of_init_cookie: bytes  # 8 octets
    options: tuple[MobilityOption, ...] = ()

    MH_TYPE: ClassVar[MhType] = MhType.COTI
    FIXED_LEN: ClassVar[int] = _INIT.size

    def __post_init__(self) -> None:
        _set(self, "care_of_init_cookie", bytes(self.care_of_init_cookie))
        _options_tuple(self)

    @classmethod
    def pull_fixed(cls, data: bytes, options: tuple) -> CareOfTestInit:
        _reserved, cookie = _INIT.unpack(data)
        return cls(cookie, options)

    def push_fixed(self) -> bytes:
        _check_len(type(self), self.care_of_init_cookie, 8, "care_of_init_cookie")
        return _INIT.pack(0, self.care_of_init_cookie)


@dataclass(frozen=True, slots=True)
class HomeTest:
    """Home Test, MH type 3 (RFC 6275 6.1.5). Codec only."""

    home_nonce_index: int
    home_init_cookie: bytes  # 8 octets
    home_keygen_token: bytes  # 8 octets
    options: tuple[MobilityOption, ...] = ()

    MH_TYPE: ClassVar[MhType] = MhType.HOT
    FIXED_LEN: ClassVar[int] = _TEST.size

    def __post_init__(self) -> None:
        _set(self, "home_init_cookie", bytes(self.home_init_cookie))
        _set(self, "home_keygen_token", bytes(self.home_keygen_token))
        _options_tuple(self)

    @classmethod
    def pull_fixed(cls, data: bytes, options: tuple) -> HomeTest:
        return cls(*_TEST.unpack(data), options)

    def push_fixed(self) -> bytes:
        _check_len(type(self), self.home_init_cookie, 8, "home_init_cookie")
        _check_len(type(self), self.home_keygen_token, 8, "home_keygen_token")
        return _TEST.pack(self.home_nonce_index, self.home_init_cookie, self.home_keygen_token)


@dataclass(frozen=True, slots=True)
class CareOfTest:
    """Care-of Test, MH type 4 (RFC 6275 6.1.6). Codec only."""

    care_of_nonce_index: int
    care_of_init_cookie: bytes  # 8 octets
    care_of_keygen_token: bytes  # 8 octets
    options: tuple[MobilityOption, ...] = ()

    MH_TYPE: ClassVar[MhType] = MhType.COT
    FIXED_LEN: ClassVar[int] = _TEST.size

    def __post_init__(self) -> None:
        _set(self, "care_of_init_cookie", bytes(self.care_of_init_cookie))
        _set(self, "care_of_keygen_token", bytes(self.care_of_keygen_token))
        _options_tuple(self)

    @classmethod
    def pull_fixed(cls, data: bytes, options: tuple) -> CareOfTest:
        return cls(*_TEST.unpack(data), options)

    def push_fixed(self) -> bytes:
        _check_len(type(self), self.care_of_init_cookie, 8, "care_of_init_cookie")
        _check_len(type(self), self.care_of_keygen_token, 8, "care_of_keygen_token")
        return _TEST.pack(self.care_of_nonce_index, self.care_of_init_cookie, self.care_of_keygen_token)


@dataclass(frozen=True, slots=True)
class BindingUpdate:
    """Binding Update, MH type 5 (RFC 6275 6.1.7; F flag RFC 5555 3.1.3, T flag RFC 5845).

    ``lifetime`` is in wire units of 4 seconds (0 = delete the binding); ``lifetime_seconds`` and
    ``mobility.mh.lifetime_units()`` convert. ``flags`` keeps the assigned bits of the flags word
    (``BuFlag``); Reserved bits are dropped on receive and sent as zero.
    """

    seq: int
    flags: BuFlag = BuFlag(0)
    lifetime: int = 0
    options: tuple[MobilityOption, ...] = ()

    MH_TYPE: ClassVar[MhType] = MhType.BU
    FIXED_LEN: ClassVar[int] = _BU.size

    def __post_init__(self) -> None:
        _set(self, "flags", BuFlag(int(self.flags) & BU_FLAGS_KNOWN))
        _options_tuple(self)

    @property
    def lifetime_seconds(self) -> int:
        return self.lifetime * LIFETIME_UNIT

    @property
    def ack(self) -> bool:  # A
        return BuFlag.A in self.flags

    @property
    def home_registration(self) -> bool:  # H
        return BuFlag.H in self.flags

    @property
    def link_local_compat(self) -> bool:  # L
        return BuFlag.L in self.flags

    @property
    def key_mgmt_mobility(self) -> bool:  # K
        return BuFlag.K in self.flags

    @property
    def force_udp(self) -> bool:  # F (RFC 5555)
        return BuFlag.F in self.flags

    @classmethod
    def pull_fixed(cls, data: bytes, options: tuple) -> BindingUpdate:
        seq, flags, lifetime = _BU.unpack(data)
        return cls(seq, BuFlag(flags & BU_FLAGS_KNOWN), lifetime, options)

    def push_fixed(self) -> bytes:
        return _BU.pack(self.seq, int(self.flags) & BU_FLAGS_KNOWN, self.lifetime)


@dataclass(frozen=True, slots=True)
class BindingAck:
    """Binding Acknowledgement, MH type 6 (RFC 6275 6.1.8). ``status`` < 128 = accepted (a
    ``BaStatus`` when the code is assigned, else a plain int). ``lifetime`` in 4-second units."""

    status: int
    flags: BaFlag = BaFlag(0)
    seq: int = 0
    lifetime: int = 0
    options: tuple[MobilityOption, ...] = ()

    MH_TYPE: ClassVar[MhType] = MhType.BA
    FIXED_LEN: ClassVar[int] = _BA.size

    def __post_init__(self) -> None:
        _set(self, "status", _enum_or_int(BaStatus, self.status))
        _set(self, "flags", BaFlag(int(self.flags) & BA_FLAGS_KNOWN))
        _options_tuple(self)

    @property
    def accepted(self) -> bool:
        return self.status < 128

    @property
    def lifetime_seconds(self) -> int:
        return self.lifetime * LIFETIME_UNIT

    @property
    def key_mgmt_mobility(self) -> bool:  # K
        return BaFlag.K in self.flags

    @classmethod
    def pull_fixed(cls, data: bytes, options: tuple) -> BindingAck:
        status, flags, seq, lifetime = _BA.unpack(data)
        return cls(status, BaFlag(flags & BA_FLAGS_KNOWN), seq, lifetime, options)

    def push_fixed(self) -> bytes:
        return _BA.pack(self.status, int(self.flags) & BA_FLAGS_KNOWN, self.seq, self.lifetime)


@dataclass(frozen=True, slots=True)
class BindingErrorMessage:
    """Binding Error, MH type 7 (RFC 6275 6.1.9). Named ``...Message`` because
    ``mobility.errors.BindingError`` is the exception that carries a BA status."""

    status: int  # BeStatus when assigned
    home_address: IPv6Address
    options: tuple[MobilityOption, ...] = ()

    MH_TYPE: ClassVar[MhType] = MhType.BE
    FIXED_LEN: ClassVar[int] = _BE.size

    def __post_init__(self) -> None:
        _set(self, "status", _enum_or_int(BeStatus, self.status))
        _set(self, "home_address", IPv6Address(self.home_address))
        _options_tuple(self)

    @classmethod
    def pull_fixed(cls, data: bytes, options: tuple) -> BindingErrorMessage:
        status, _reserved, hoa = _BE.unpack(data)
        return cls(status, IPv6Address(hoa), options)

    def push_fixed(self) -> bytes:
        return _BE.pack(self.status, 0, self.home_address.packed)


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    """A Mobility Header whose MH Type this codec does not implement. ``data`` is everything after
    the Checksum field (message data and options, verbatim). The receiver answers it with a Binding
    Error, status 2 (RFC 6275 9.2): ``make_binding_error(BeStatus.UNKNOWN_MH_TYPE, hoa)``."""

    mh_type: int
    data: bytes

    def __post_init__(self) -> None:
        _set(self, "data", bytes(self.data))


MobilityMessage = Union[
    BindingRefreshRequest,
    HomeTestInit,
    CareOfTestInit,
    HomeTest,
    CareOfTest,
    BindingUpdate,
    BindingAck,
    BindingErrorMessage,
]

#: Dispatch table for ``pull_mh``.
MESSAGE_CLASSES: dict[int, type] = {
    cls.MH_TYPE: cls
    for cls in (
        BindingRefreshRequest,
        HomeTestInit,
        CareOfTestInit,
        HomeTest,
        CareOfTest,
        BindingUpdate,
        BindingAck,
        BindingErrorMessage,
    )
}


def make_binding_error(status: BeStatus | int, hoa: IPv6Address | bytes | str) -> BindingErrorMessage:
    """The Binding Error to send (RFC 6275 9.2, 9.3.3): status 1 for a Home Address option without a
    binding, status 2 for an ``UnknownMessage``. ``hoa`` is the home address from the offending
    packet's Home Address option (or its source address when it had none)."""
    return BindingErrorMessage(status, IPv6Address(hoa))


# --- checksum ------------------------------------------------------------------------------------


def _addr16(addr: bytes | IPv6Address) -> bytes:
    if isinstance(addr, IPv6Address):
        return addr.packed
    if len(addr) != 16:
        raise EncodeError(f"an IPv6 address is 16 octets, got {len(addr)}")
    return bytes(addr)


def _ones_sum(src: bytes | IPv6Address, dst: bytes | IPv6Address, mh: bytes) -> int:
    """One's-complement sum (mod 0xFFFF) of pseudo-header + MH (RFC 6275 6.1.1, RFC 2460 8.1).

    Summing 16-bit words with end-around carry equals the big integer modulo 0xFFFF, since
    2**16 == 1 (mod 0xFFFF); a result of 0 stands for the one's-complement 0xFFFF ("negative zero").
    """
    pseudo = _PSEUDO.pack(_addr16(src), _addr16(dst), len(mh), IPPROTO_MH)
    buf = pseudo + mh + (b"\x00" if len(mh) & 1 else b"")
    return int.from_bytes(buf, "big") % 0xFFFF


def mh_checksum(mh: bytes, src: bytes | IPv6Address, dst: bytes | IPv6Address) -> int:
    """The Checksum value for ``mh`` (whose Checksum field must be zero)."""
    return 0xFFFF - (_ones_sum(src, dst, mh) or 0xFFFF)


def verify_checksum(data: bytes, src: bytes | IPv6Address, dst: bytes | IPv6Address) -> bool:
    """True when the MH ``data`` carries a correct checksum for ``src``/``dst`` (the pseudo-header
    addresses described in the module docstring: HoA from a Home Address option as source, HoA from
    a type 2 routing header as destination)."""
    try:
        return _ones_sum(src, dst, data) == 0
    except EncodeError:
        return False


# --- codec ---------------------------------------------------------------------------------------


def pull_mh_header(data: bytes) -> tuple[int, int]:
    """Validate the common MH header of ``data`` (one whole MH); return (mh_type, total length).

    RFC 6275 6.1.1 / 9.2: Payload Proto must be IPPROTO_NONE (59), the length given by Header Len
    must be exactly the length of ``data``.
    """
    if len(data) < MH_ALIGN:
        raise ParseError(f"Mobility Header truncated: {len(data)} octets")
    proto, hlen, mh_type, _reserved, _cksum = _HDR.unpack_from(data)
    if proto != IPPROTO_NONE:
        raise ParseError(f"MH Payload Proto {proto}, expected {int(IPPROTO_NONE)}", pointer=0)
    total = (hlen + 1) * MH_ALIGN
    if total != len(data):
        raise ParseError(f"MH Header Len {hlen} says {total} octets, have {len(data)}")
    return mh_type, total


def pull_mh(data: bytes) -> MobilityMessage | UnknownMessage:
    """Decode one Mobility Header (RFC 6275 6.1). Does not check the checksum (``verify_checksum``).

    Raises ParseError for truncated input, a Header Len that does not match ``len(data)`` or is too
    small for the message type, Payload Proto != 59, or malformed options.
    """
    data = bytes(data)
    mh_type, total = pull_mh_header(data)
    cls = MESSAGE_CLASSES.get(mh_type)
    if cls is None:
        return UnknownMessage(mh_type, data[HDR_LEN:])
    fixed_end = HDR_LEN + cls.FIXED_LEN
    if fixed_end > total:
        raise ParseError(f"MH type {mh_type}: Header Len too small for the {cls.__name__} fixed part", pointer=1)
    options = pull_options(data[fixed_end:total])
    return cls.pull_fixed(data[HDR_LEN:fixed_end], options)


def _push_body(msg: MobilityMessage | UnknownMessage) -> tuple[int, bytes]:
    """(MH type, octets after the Checksum field) of ``msg``, padded to the 8-octet rule."""
    if isinstance(msg, UnknownMessage):
        if (HDR_LEN + len(msg.data)) % MH_ALIGN:
            raise EncodeError("UnknownMessage.data must make the MH a multiple of 8 octets")
        return msg.mh_type, msg.data
    try:
        fixed = msg.push_fixed()
    except struct.error as exc:
        raise EncodeError(f"{type(msg).__name__}: {exc}") from None
    return msg.MH_TYPE, fixed + push_options(msg.options, HDR_LEN + len(fixed))


def push_mh(msg: MobilityMessage | UnknownMessage, src: bytes | IPv6Address, dst: bytes | IPv6Address) -> bytes:
    """Encode ``msg`` as a Mobility Header with the checksum for pseudo-header ``src``/``dst``.

    ``src``/``dst`` are the upper-layer addresses (module docstring): for a BU sent with a Home
    Address option pass the HoA as ``src``; for a BA sent with a type 2 routing header pass the HoA
    as ``dst``. Raises EncodeError when a field does not fit its wire format.
    """
    mh_type, body = _push_body(msg)
    total = HDR_LEN + len(body)
    if total > 256 * MH_ALIGN:
        raise EncodeError(f"Mobility Header of {total} octets exceeds Header Len 255")
    try:
        header = _HDR.pack(IPPROTO_NONE, total // MH_ALIGN - 1, mh_type, 0, 0)
    except struct.error as exc:
        raise EncodeError(f"MH type {mh_type}: {exc}") from None
    mh = bytearray(header + body)
    struct.pack_into("!H", mh, 4, mh_checksum(bytes(mh), src, dst))
    return bytes(mh)
