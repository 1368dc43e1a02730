"""Home Address option, type 2 routing header and the MH locator (RFC 6275 6.3, 6.4, 6.1.1)."""

from __future__ import annotations

import struct
from ipaddress import IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mobility.constants import BaFlag, BuFlag
from mobility.errors import EncodeError, ParseError
from mobility.ipv6ext import (
    DestinationOptions,
    MhLocation,
    Type2RoutingHeader,
    locate_mh,
    pull_destination_options,
    pull_mh_packet,
    pull_type2_routing_header,
    push_home_address_option,
    push_mh_packet,
    push_type2_routing_header,
)
from mobility.mh import BindingAck, BindingUpdate, push_mh
from mobility.options import AlternateCareOfAddress

from .test_mh import message_st
from .test_options import ipv6

HOA = IPv6Address("2001:db8:1::100")
HA = IPv6Address("2001:db8:1::1")
COA = IPv6Address("2001:db8:f::100")


def ipv6_header(src, dst, nh: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nh, 64, IPv6Address(src).packed, IPv6Address(dst).packed)


# --- vectors (mipv6.md sections 2, 10, 11) -------------------------------------------------------


def test_home_address_option_vector():
    hdr = push_home_address_option(HOA)
    assert hdr == bytes.fromhex("8702010200 00c910".replace(" ", "")) + HOA.packed
    assert len(hdr) == 24 and hdr.index(b"\xc9") % 8 == 6  # 8n+6
    assert pull_destination_options(hdr + b"rest") == DestinationOptions(135, HOA, 24)


def test_type2_routing_header_vector():
    hdr = push_type2_routing_header(HOA)
    assert hdr == bytes.fromhex("8702020100000000") + HOA.packed
    assert pull_type2_routing_header(hdr) == Type2RoutingHeader(135, HOA, 1)


@given(ipv6, st.integers(0, 255), st.integers(0, 1))
def test_round_trips(hoa, nh, sl):
    assert pull_destination_options(push_home_address_option(hoa, nh)) == DestinationOptions(nh, hoa, 24)
    assert pull_type2_routing_header(push_type2_routing_header(hoa, nh, sl)) == Type2RoutingHeader(nh, hoa, sl)


def test_destination_options_with_other_options():
    # Pad1 and an unknown skippable option (type 0x1e) put the HAO at 8n+6; PadN(8) ends the header
    body = b"\x00" + bytes.fromhex("1e0100") + bytes.fromhex("c910") + HOA.packed + bytes.fromhex("0106") + bytes(6)
    hdr = bytes([59, (2 + len(body)) // 8 - 1]) + body
    assert len(hdr) % 8 == 0
    assert pull_destination_options(hdr) == DestinationOptions(59, HOA, len(hdr))
    no_hao = bytes.fromhex("3b00" "01040000" "0000")
    assert pull_destination_options(no_hao) == DestinationOptions(59, None, 8)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes.fromhex("870201020000c910") + HOA.packed[:15],  # truncated
        bytes.fromhex("870201020000c90f") + HOA.packed,  # HAO length 15
        bytes.fromhex("8705" "c910") + HOA.packed + bytes.fromhex("c910") + HOA.packed + bytes(8),  # two HAOs
        bytes.fromhex("8700" "0110" "00000000"),  # PadN past the header
        bytes.fromhex("8700" "00000000" "00c9"),  # option type without length
    ],
)
def test_malformed_destination_options(data):
    with pytest.raises(ParseError):
        pull_destination_options(data)


@pytest.mark.parametrize(
    "data",
    [
        bytes.fromhex("8702020100000000") + HOA.packed[:8],  # truncated
        bytes.fromhex("8702000100000000") + HOA.packed,  # routing type 0
        bytes.fromhex("8704020100000000") + HOA.packed + bytes(16),  # Hdr Ext Len 4
        bytes.fromhex("8702020200000000") + HOA.packed,  # Segments Left 2
    ],
)
def test_malformed_type2_routing_header(data):
    with pytest.raises(ParseError):
        pull_type2_routing_header(data)


def test_push_rejects_bad_input():
    with pytest.raises(EncodeError):
        push_type2_routing_header(HOA, segments_left=2)
    with pytest.raises(EncodeError):
        push_home_address_option(b"\x01\x02")


# --- locating the MH and the checksum addresses ---------------------------------------------------


def test_bu_packet_from_care_of_address():
    bu = BindingUpdate(9, BuFlag.A | BuFlag.H, 100, (AlternateCareOfAddress(COA),))
    pkt = push_mh_packet(bu, COA, HA, hoa=HOA)
    assert pkt[6] == 60 and pkt[40:64] == push_home_address_option(HOA)
    assert pkt[64:] == push_mh(bu, HOA, HA)  # pseudo-header source = HoA
    loc, msg = pull_mh_packet(pkt)
    assert msg == bu
    assert loc == MhLocation(64, 32, 5, COA, HA, HOA, None)
    assert (loc.pseudo_src, loc.pseudo_dst) == (HOA, HA)


def test_ba_packet_to_care_of_address():
    ba = BindingAck(0, BaFlag.K, 9, 100)
    pkt = push_mh_packet(ba, HA, COA, rh2_hoa=HOA)
    assert pkt[6] == 43 and pkt[64:] == push_mh(ba, HA, HOA)  # pseudo-header destination = HoA
    loc, msg = pull_mh_packet(pkt)
    assert msg == ba and (loc.pseudo_src, loc.pseudo_dst) == (HA, HOA)


def test_processed_rh2_uses_ipv6_destination():
    ba = BindingAck(0, seq=1)
    rh2 = push_type2_routing_header(COA, 135, segments_left=0)  # already swapped by the MN
    mh = push_mh(ba, HA, HOA)
    pkt = ipv6_header(HA, HOA, 43, rh2 + mh) + rh2 + mh
    loc, msg = pull_mh_packet(pkt)
    assert msg == ba and loc.rh2_hoa is None and loc.pseudo_dst == HOA


def test_hop_by_hop_and_both_headers():
    ba = BindingAck(0, seq=1)
    mh = push_mh(ba, HOA, HOA)
    dst_opts = push_home_address_option(HOA, 135)
    rh2 = push_type2_routing_header(HOA, 60)
    hbh = bytes.fromhex("2b00" "050200000100")  # router alert, next header = routing
    payload = hbh + rh2 + dst_opts + mh
    loc, msg = pull_mh_packet(ipv6_header(COA, COA, 0, payload) + payload)
    assert loc.offset == 40 + 8 + 24 + 24 and msg == ba and loc.hoa == HOA and loc.rh2_hoa == HOA


@pytest.mark.parametrize("nh, payload", [(50, bytes(16)), (6, bytes(20)), (59, b""), (44, bytes.fromhex("8700000100000001") + bytes(8))])
def test_no_cleartext_mh(nh, payload):
    assert locate_mh(ipv6_header(COA, HA, nh, payload) + payload) is None
    assert pull_mh_packet(ipv6_header(COA, HA, nh, payload) + payload) is None


def test_bad_checksum_rejected_unless_asked():
    pkt = bytearray(push_mh_packet(BindingUpdate(1), HOA, HA))
    pkt[-1] ^= 1
    with pytest.raises(ParseError):
        pull_mh_packet(bytes(pkt))
    assert pull_mh_packet(bytes(pkt), verify=False)[1] == BindingUpdate(1, lifetime=0)


def test_trailing_link_layer_bytes_ignored():
    pkt = push_mh_packet(BindingUpdate(3), HOA, HA)
    assert pull_mh_packet(pkt + b"\x00" * 6)[1] == BindingUpdate(3)


@pytest.mark.parametrize(
    "pkt",
    [
        b"",
        bytes(39),
        b"\x45" + bytes(39),  # IPv4
        ipv6_header(HOA, HA, 135, bytes(16)) + bytes(8),  # payload length beyond packet
        ipv6_header(HOA, HA, 135, bytes(4)) + bytes(4),  # MH shorter than 8
        ipv6_header(HOA, HA, 135, bytes(8)) + bytes.fromhex("3b01050000000000"),  # Header Len beyond payload
        ipv6_header(HOA, HA, 60, bytes(8)) + bytes.fromhex("8701000000000000"),  # dest opts beyond payload
        ipv6_header(HOA, HA, 43, bytes(8)) + bytes.fromhex("8700020100000000"),  # RH2 too short
    ],
)
def test_malformed_packets(pkt):
    with pytest.raises(ParseError):
        locate_mh(pkt)


@given(st.binary(max_size=120))
def test_random_packets_raise_only_parse_error(data):
    for pkt in (data, ipv6_header(HOA, HA, data[0] if data else 135, data[1:]) + data[1:]):
        try:
            pull_mh_packet(pkt)
        except ParseError:
            pass


@given(message_st, ipv6, ipv6, ipv6, st.booleans(), st.booleans())
def test_packet_round_trip(msg, src, dst, home, with_hao, with_rh2):
    hoa = home if with_hao else None
    rh2 = home if with_rh2 else None
    loc, got = pull_mh_packet(push_mh_packet(msg, src, dst, hoa=hoa, rh2_hoa=rh2))
    assert got == msg and (loc.src, loc.dst, loc.hoa, loc.rh2_hoa) == (src, dst, hoa, rh2)
