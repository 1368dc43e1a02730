"""Mobility options codec (RFC 6275 6.2, RFC 5555 3): vectors, round trip, alignment, bad input."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mobility.constants import Ipv4AckStatus, OptionType
from mobility.errors import EncodeError, ParseError
from mobility.options import (
    OPTION_CLASSES,
    AlternateCareOfAddress,
    BindingAuthorizationData,
    BindingRefreshAdvice,
    Ipv4AddressAck,
    Ipv4CareOfAddress,
    Ipv4HomeAddress,
    NatDetection,
    NonceIndices,
    UnknownOption,
    find_option,
    pull_options,
    push_options,
    push_padding,
)

# --- strategies (also used by test_mh*.py) --------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
ipv6 = st.builds(IPv6Address, st.integers(0, 2**128 - 1))
ipv4 = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
unknown_types = st.integers(2, 255).filter(lambda t: t not in OPTION_CLASSES)

option_st = st.one_of(
    st.builds(BindingRefreshAdvice, u16),
    st.builds(AlternateCareOfAddress, ipv6),
    st.builds(NonceIndices, u16, u16),
    st.builds(Ipv4HomeAddress, ipv4, st.integers(0, 63), st.booleans()),
    st.builds(Ipv4AddressAck, u8, st.integers(0, 63), ipv4),
    st.builds(NatDetection, st.booleans(), u32),
    st.builds(Ipv4CareOfAddress, ipv4),
    st.builds(UnknownOption, unknown_types, st.binary(max_size=40)),
)
#: Binding Authorization Data must end the message unpadded: authenticator length 8n+4.
auth_st = st.builds(
    BindingAuthorizationData, st.integers(0, 6).flatmap(lambda n: st.binary(min_size=8 * n + 4, max_size=8 * n + 4))
)
option_lists = st.tuples(st.lists(option_st, max_size=6), st.none() | auth_st).map(
    lambda t: tuple(t[0]) + ((t[1],) if t[1] is not None else ())
)

ALIGN = {  # xn+y from RFC 6275 6.2.4-6.2.7 and RFC 5555 3.1.1, 3.1.2, 3.2.1, 3.2.2
    OptionType.BINDING_REFRESH_ADVICE: (2, 0),
    OptionType.ALTERNATE_COA: (8, 6),
    OptionType.NONCE_INDICES: (2, 0),
    OptionType.BINDING_AUTH_DATA: (8, 2),
    OptionType.IPV4_HOME_ADDRESS: (4, 0),
    OptionType.IPV4_ADDRESS_ACK: (4, 0),
    OptionType.NAT_DETECTION: (4, 0),
    OptionType.IPV4_COA: (4, 0),
}


def walk_tlv(data: bytes):
    """Independent TLV walker: yields (offset, type, length), padding included."""
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            yield pos, 0, 0
            pos += 1
            continue
        yield pos, data[pos], data[pos + 1]
        pos += 2 + data[pos + 1]
    assert pos == len(data)


# --- known answers -------------------------------------------------------------------------------


def test_dsmipv6_vectors_from_reference():
    # dsmipv6.md section 2 (TEST): dynamic IPv4 HoA request; NAT Detection F=1 refresh 110 s
    assert push_options([Ipv4HomeAddress("0.0.0.0")], 8) == bytes.fromhex("1d06800000000000")
    assert pull_options(bytes.fromhex("1d06800000000000")) == (Ipv4HomeAddress("0.0.0.0", 32, False),)
    assert pull_options(bytes.fromhex("1f0680000000006e")) == (NatDetection(True, 110),)


def test_bu_layout_ipv4_hoa_and_coa():
    # mipv6.md section 9: options at 12 and 20, end at 28, PadN(4) -> total 32
    out = push_options([Ipv4HomeAddress("192.0.2.7"), Ipv4CareOfAddress("198.51.100.1")], 12)
    assert out == bytes.fromhex("1d068000c0000207" "20060000c6336401" "01020000")


def test_acoa_gets_padn2_after_bu_fixed_part():
    out = push_options([AlternateCareOfAddress("2001:db8:f::100")], 12)
    assert out[:4] == bytes.fromhex("01000310") and len(out) == 20


def test_field_encodings():
    assert push_options([BindingRefreshAdvice(0x1234)], 12) == bytes.fromhex("02021234") + push_padding(0)
    assert NonceIndices(1, 2).push_data() == bytes.fromhex("00010002")
    assert Ipv4HomeAddress("10.0.0.1", 24, True).push_data() == bytes.fromhex("6200") + bytes([10, 0, 0, 1])
    assert Ipv4AddressAck(Ipv4AckStatus.DYNAMIC_HOA_NOT_AVAILABLE, 0, "0.0.0.0").push_data() == bytes(
        [132, 0, 0, 0, 0, 0]
    )
    assert Ipv4AddressAck(0, 32, "10.0.0.1").push_data() == bytes([0, 0x80, 10, 0, 0, 1])
    assert NatDetection(False, 0xFFFFFFFF).push_data() == bytes.fromhex("0000ffffffff")
    assert Ipv4CareOfAddress("192.0.2.1").push_data() == bytes.fromhex("0000c0000201")


def test_reserved_bits_ignored_on_receive():
    # IPv4 HoA: reserved low 9 bits set; Ack: Res bits set; NAT: reserved set; CoA reserved set
    data = bytes.fromhex("1d0681ff0a000001" "1e06008303000000" "1f067fff00000000" "2006ffff0a000002")
    assert pull_options(data) == (
        Ipv4HomeAddress("10.0.0.1", 32, False),
        Ipv4AddressAck(0, 32, "3.0.0.0"),
        NatDetection(False, 0),
        Ipv4CareOfAddress("10.0.0.2"),
    )


def test_ipv4_ack_status_enum_and_success():
    assert Ipv4AddressAck(130, 0, "0.0.0.0").status is Ipv4AckStatus.INCORRECT_IPV4_HOA
    assert Ipv4AddressAck(127, 0, "0.0.0.0").success and not Ipv4AddressAck(200, 0, "0.0.0.0").success


def test_padding_skipped_and_unknown_kept():
    data = b"\x00" + bytes.fromhex("0103000000") + bytes.fromhex("0602aabb") + bytes.fromhex("02020005")
    assert pull_options(data) == (UnknownOption(6, b"\xaa\xbb"), BindingRefreshAdvice(5))


def test_unknown_option_pushed_verbatim_unaligned():
    assert push_options([UnknownOption(200, b"xyz")], 11) == bytes([200, 3]) + b"xyz"


def test_refresh_seconds_and_find_option():
    opts = (NatDetection(True, 5), BindingRefreshAdvice(15))
    assert find_option(opts, BindingRefreshAdvice).refresh_seconds == 60
    assert find_option(opts, AlternateCareOfAddress) is None


def test_addresses_normalised():
    assert AlternateCareOfAddress("2001:db8::1") == AlternateCareOfAddress(IPv6Address("2001:db8::1").packed)
    assert Ipv4CareOfAddress("192.0.2.1").coa == IPv4Address("192.0.2.1")


# --- round trip and alignment --------------------------------------------------------------------


@given(option_lists, st.integers(0, 64))
def test_round_trip_and_alignment(options, offset):
    out = push_options(options, offset)
    assert pull_options(out) == options
    assert (offset + len(out)) % 8 == 0
    kept = []
    for pos, otype, _olen in walk_tlv(out):
        if otype in (0, 1):
            continue
        kept.append(otype)
        x, y = ALIGN.get(otype, (1, 0))
        assert (offset + pos) % x == y, (otype, offset + pos)
    assert kept == [o.TYPE for o in options]
    if options and isinstance(options[-1], BindingAuthorizationData):  # RFC 6275 6.2.7: no trailing pad
        assert out.endswith(options[-1].authenticator)


@given(option_st, st.integers(0, 7))
def test_single_option_round_trip(option, offset):
    assert pull_options(push_options([option], offset)) == (option,)


@given(st.integers(0, 257))
def test_padding_lengths(n):
    pad = push_padding(n)
    assert len(pad) == n and pull_options(pad) == ()


# --- bad input -----------------------------------------------------------------------------------


@given(st.binary(max_size=80))
def test_random_input_raises_only_parse_error(data):
    try:
        pull_options(data)
    except ParseError:
        pass


@pytest.mark.parametrize(
    "data",
    [
        b"\x03",  # type without length
        bytes.fromhex("0310") + bytes(15),  # ACoA one octet short
        bytes.fromhex("030f") + bytes(15),  # ACoA with length 15
        bytes.fromhex("020300000000"),  # BRA length 3
        bytes.fromhex("0403000000"),  # Nonce Indices length 3
        bytes.fromhex("1d05" "0000000000"),  # IPv4 HoA length 5
        bytes.fromhex("1e07" "00000000000000"),
        bytes.fromhex("1f02" "0000"),
        bytes.fromhex("2000"),
        bytes.fromhex("0105" "0000"),  # PadN running past the end
    ],
)
def test_malformed_options(data):
    with pytest.raises(ParseError):
        pull_options(data)


def test_encode_errors():
    with pytest.raises(EncodeError):
        push_options([BindingAuthorizationData(bytes(12)), BindingRefreshAdvice(1)], 12)  # not last
    with pytest.raises(EncodeError):
        push_options([BindingAuthorizationData(bytes(10))], 12)  # would need trailing padding
    with pytest.raises(EncodeError):
        push_options([BindingRefreshAdvice(0x10000)], 12)
    with pytest.raises(EncodeError):
        push_options([Ipv4HomeAddress("1.2.3.4", 64)], 12)
    with pytest.raises(EncodeError):
        push_options([UnknownOption(1, b"")], 12)  # padding is not an option
    with pytest.raises(EncodeError):
        push_options([UnknownOption(99, bytes(256))], 12)
    assert issubclass(EncodeError, ValueError)


def test_parse_error_is_a_bits_parse_error():
    import bits.errors

    with pytest.raises(bits.errors.ParseError):
        pull_options(b"\x05")
