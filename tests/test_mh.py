"""Mobility Header codec (RFC 6275 6.1): vectors, round trip, checksum, malformed input."""

from __future__ import annotations

from ipaddress import IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mobility.constants import (
    BA_FLAGS_KNOWN,
    BU_FLAGS_KNOWN,
    BaFlag,
    BaStatus,
    BeStatus,
    BuFlag,
    MhType,
)
from mobility.errors import BindingError, EncodeError, MobilityError, ParseError
from mobility.mh import (
    MESSAGE_CLASSES,
    BindingAck,
    BindingErrorMessage,
    BindingRefreshRequest,
    BindingUpdate,
    CareOfTest,
    CareOfTestInit,
    HomeTest,
    HomeTestInit,
    UnknownMessage,
    lifetime_seconds,
    lifetime_units,
    make_binding_error,
    mh_checksum,
    pull_mh,
    push_mh,
    verify_checksum,
)
from mobility.options import AlternateCareOfAddress, BindingRefreshAdvice, NatDetection

from .test_options import ipv6, option_lists, u8, u16

HOA = IPv6Address("2001:db8:1::100")
HA = IPv6Address("2001:db8:1::1")
COA = IPv6Address("2001:db8:f::100")

cookie = st.binary(min_size=8, max_size=8)
bu_flags = u16.map(lambda w: BuFlag(w & BU_FLAGS_KNOWN))
ba_flags = u8.map(lambda w: BaFlag(w & BA_FLAGS_KNOWN))
unknown_mh = st.builds(
    UnknownMessage,
    st.integers(0, 255).filter(lambda t: t not in MESSAGE_CLASSES),
    st.integers(0, 20).flatmap(lambda n: st.binary(min_size=8 * n + 2, max_size=8 * n + 2)),
)
message_st = st.one_of(
    st.builds(BindingRefreshRequest, option_lists),
    st.builds(HomeTestInit, cookie, option_lists),
    st.builds(CareOfTestInit, cookie, option_lists),
    st.builds(HomeTest, u16, cookie, cookie, option_lists),
    st.builds(CareOfTest, u16, cookie, cookie, option_lists),
    st.builds(BindingUpdate, u16, bu_flags, u16, option_lists),
    st.builds(BindingAck, u8, ba_flags, u16, u16, option_lists),
    st.builds(BindingErrorMessage, u8, ipv6, option_lists),
    unknown_mh,
)


# --- known answers (mipv6.md section 2, worked example checked with scapy and tshark) -------------

BU_VECTOR = bytes.fromhex("3b030500" "5fca" "0001" "d000" "003c" "0100" "0310") + COA.packed
BA_VECTOR = bytes.fromhex("3b010600" "6033" "0080" "0001" "003c" "01020000")


def test_bu_vector():
    bu = BindingUpdate(seq=1, flags=BuFlag.A | BuFlag.H | BuFlag.K, lifetime=60, options=(AlternateCareOfAddress(COA),))
    assert push_mh(bu, HOA, HA) == BU_VECTOR
    assert pull_mh(BU_VECTOR) == bu
    assert verify_checksum(BU_VECTOR, HOA, HA)
    assert not verify_checksum(BU_VECTOR, COA, HA)  # the CoA is the wrong pseudo-header source
    assert mh_checksum(BU_VECTOR[:4] + b"\0\0" + BU_VECTOR[6:], COA, HA) == 0x5FBC


def test_ba_vector():
    ba = BindingAck(BaStatus.ACCEPTED, BaFlag.K, seq=1, lifetime=60)
    assert push_mh(ba, HA, HOA) == BA_VECTOR
    assert pull_mh(BA_VECTOR) == ba
    assert verify_checksum(BA_VECTOR, HA, HOA) and not verify_checksum(BA_VECTOR, HA, COA)


def test_empty_message_sizes():
    # RFC 6275 6.1.2-6.1.9: Header Len with no options
    sizes = {
        BindingRefreshRequest(): 8,
        HomeTestInit(bytes(8)): 16,
        CareOfTestInit(bytes(8)): 16,
        HomeTest(0, bytes(8), bytes(8)): 24,
        CareOfTest(0, bytes(8), bytes(8)): 24,
        BindingUpdate(0): 16,
        BindingAck(0): 16,
        BindingErrorMessage(1, HOA): 24,
    }
    for msg, size in sizes.items():
        data = push_mh(msg, HOA, HA)
        assert len(data) == size and data[1] == size // 8 - 1 and data[2] == msg.MH_TYPE
        assert data[0] == 59 and data[3] == 0


def test_bu_flags_and_f_flag_position():
    bu = BindingUpdate(7, BuFlag.A | BuFlag.H | BuFlag.F, lifetime_units(3600))
    data = push_mh(bu, HOA, HA)
    assert data[8:10] == b"\xc1\x00"  # A H ... F = 0x0100 (RFC 5555 3.1.3)
    assert bu.ack and bu.home_registration and bu.force_udp
    assert not bu.key_mgmt_mobility and not bu.link_local_compat
    assert bu.lifetime == 900 and bu.lifetime_seconds == 3600


def test_reserved_bits_dropped():
    data = bytearray(push_mh(BindingUpdate(1, BuFlag.A), HOA, HA))
    data[9] |= 0x3F  # reserved low bits of the BU flags word
    data[3] = 0xFF  # MH Reserved
    assert pull_mh(bytes(data)) == BindingUpdate(1, BuFlag.A)
    ba = bytearray(push_mh(BindingAck(0, BaFlag.K), HA, HOA))
    ba[7] |= 0x07
    assert pull_mh(bytes(ba)).flags == BaFlag.K
    assert BindingUpdate(1, 0xFFFF).flags == BuFlag(BU_FLAGS_KNOWN)


def test_lifetime_helpers():
    assert lifetime_units(0) == 0 and lifetime_units(7) == 1 and lifetime_units(8) == 2
    assert lifetime_units(10**9) == 0xFFFF and lifetime_units(-5) == 0
    assert lifetime_seconds(0xFFFF) == 262140
    assert BindingAck(0, lifetime=15).lifetime_seconds == 60


def test_status_enums():
    ba = pull_mh(push_mh(BindingAck(135, seq=9), HA, HOA))
    assert ba.status is BaStatus.SEQ_OUT_OF_WINDOW and not ba.accepted
    assert BindingAck(1).accepted and not BindingAck(128).accepted
    assert BindingAck(2).status == 2  # unassigned here, kept as an int
    assert BaStatus.UDP_ENCAPSULATION_REFUSED == 144
    assert BindingErrorMessage(2, HOA).status is BeStatus.UNKNOWN_MH_TYPE


def test_unknown_type_and_binding_error():
    data = bytes.fromhex("3b01" "0c00" "0000") + bytes(10)  # MH type 12 (HA Switch), 16 octets
    msg = pull_mh(data)
    assert msg == UnknownMessage(12, bytes(10))
    be = make_binding_error(BeStatus.UNKNOWN_MH_TYPE, HOA)
    assert be == BindingErrorMessage(BeStatus.UNKNOWN_MH_TYPE, HOA, ())
    out = push_mh(be, HA, HOA)
    assert out[2] == MhType.BE and out[6] == 2 and out[8:24] == HOA.packed
    assert push_mh(msg, HOA, HA)[6:] == data[6:]  # verbatim


def test_binding_error_exception():
    exc = BindingError(BaStatus.NOT_HOME_SUBNET, "2001:db8:9::/64 is not served")
    assert isinstance(exc, MobilityError) and exc.status is BaStatus.NOT_HOME_SUBNET
    assert "132" in str(exc)
    assert BindingError(150).status == 150
    with pytest.raises(ValueError):
        BindingError(BaStatus.ACCEPTED)


def test_options_in_ba():
    ba = BindingAck(0, BaFlag.K, 3, 100, (BindingRefreshAdvice(90), NatDetection(False, 110)))
    data = push_mh(ba, HA, HOA)
    assert len(data) % 8 == 0 and pull_mh(data) == ba
    assert BindingAck(0, options=[BindingRefreshAdvice(1)]).options == (BindingRefreshAdvice(1),)


# --- round trip ----------------------------------------------------------------------------------


@given(message_st, ipv6, ipv6)
def test_round_trip(msg, src, dst):
    data = push_mh(msg, src, dst)
    assert len(data) % 8 == 0 and data[1] == len(data) // 8 - 1
    assert pull_mh(data) == msg
    assert verify_checksum(data, src, dst)
    assert push_mh(pull_mh(data), src, dst) == data


@given(message_st, ipv6, ipv6, st.data())
def test_any_single_bit_error_is_detected(msg, src, dst, data):
    mh = bytearray(push_mh(msg, src, dst))
    bit = data.draw(st.integers(0, len(mh) * 8 - 1))
    mh[bit // 8] ^= 0x80 >> (bit % 8)
    assert not verify_checksum(bytes(mh), src, dst)


# --- malformed input -----------------------------------------------------------------------------


def _parse_or_parse_error(data: bytes) -> None:
    try:
        msg = pull_mh(data)
    except ParseError:
        return
    assert isinstance(msg, (*MESSAGE_CLASSES.values(), UnknownMessage))


@given(st.binary(max_size=300))
def test_random_input_raises_only_parse_error(data):
    _parse_or_parse_error(data)


@given(st.integers(0, 12), st.integers(0, 255), st.data())
def test_random_body_with_valid_header(hlen, mh_type, data):
    body = data.draw(st.binary(min_size=8 * hlen + 2, max_size=8 * hlen + 2))
    _parse_or_parse_error(bytes([59, hlen, mh_type, 0, 0, 0]) + body)


def test_empty_input():
    with pytest.raises(ParseError):
        pull_mh(b"")


@pytest.mark.parametrize(
    "data, why",
    [
        (BU_VECTOR[:7], "truncated"),
        (BU_VECTOR[:24], "shorter than Header Len"),
        (BU_VECTOR + bytes(8), "longer than Header Len"),
        (bytes([6]) + BU_VECTOR[1:], "Payload Proto not 59"),
        (bytes.fromhex("3b000500000000000000"), "not a multiple of 8"),
        (bytes.fromhex("3b00050000000000"), "BU fixed part does not fit Header Len 0"),
        (bytes.fromhex("3b01070000000100") + bytes(8), "BE needs Header Len 2"),
        (bytes.fromhex("3b01050000000001d000003c0310") + bytes(2), "option runs past the end"),
        (bytes.fromhex("3b01050000000001d000003c0201"), "BRA with length 1"),
    ],
)
def test_malformed(data, why):
    with pytest.raises(ParseError):
        pull_mh(data)


def test_parameter_problem_pointers():
    # RFC 6275 9.2: ICMP Parameter Problem points at Payload Proto (0) or Header Len (1)
    with pytest.raises(ParseError) as exc:
        pull_mh(bytes([6]) + BU_VECTOR[1:])
    assert exc.value.pointer == 0
    with pytest.raises(ParseError) as exc:
        pull_mh(bytes.fromhex("3b00050000000000"))
    assert exc.value.pointer == 1
    with pytest.raises(ParseError) as exc:
        pull_mh(BU_VECTOR[:24])
    assert exc.value.pointer is None


def test_encode_errors():
    for bad in (
        BindingUpdate(0x10000),
        BindingUpdate(1, lifetime=-1),
        BindingAck(256),
        HomeTestInit(bytes(7)),
        HomeTest(1, bytes(8), bytes(9)),
        UnknownMessage(99, bytes(3)),
        BindingRefreshRequest(tuple(AlternateCareOfAddress(HOA) for _ in range(120))),  # > 2048 octets
    ):
        with pytest.raises(EncodeError):
            push_mh(bad, HOA, HA)
    with pytest.raises(EncodeError):
        push_mh(BindingRefreshRequest(), b"\x00" * 4, HA)
