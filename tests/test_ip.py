"""bits.ip against scapy-built packets (scapy is the independent oracle)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    HAO,
    MIP6MH_BU,
)

from bits.errors import ParseError
from bits.ip import (
    ipv4_checksum,
    pull_ip,
    pull_selectors,
    push_ipv4_header,
    push_ipv6_header,
)

A6, B6 = "2001:db8:1::10", "2001:db8:2::1"
HOA = "2001:db8:1::99"


def _int(a: str) -> int:
    return int(ipaddress.ip_address(a))


def test_udp_v6_selectors():
    p = bytes(IPv6(src=A6, dst=B6) / UDP(sport=1234, dport=5678) / b"x")
    s = pull_selectors(p)
    assert (s.version, s.src, s.dst, s.proto, s.sport, s.dport) == (6, _int(A6), _int(B6), 17, 1234, 5678)


def test_tcp_v4_selectors():
    p = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=80, dport=443))
    s = pull_selectors(p)
    assert (s.version, s.proto, s.sport, s.dport) == (4, 6, 80, 443)


def test_icmp_selectors():
    s4 = pull_selectors(bytes(IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=8, code=0)))
    assert (s4.proto, s4.icmp_type, s4.icmp_code) == (1, 8, 0)
    s6 = pull_selectors(bytes(IPv6(src=A6, dst=B6) / ICMPv6EchoRequest()))
    assert (s6.proto, s6.icmp_type, s6.icmp_code) == (58, 128, 0)


def test_mh_type_selector_behind_hao():
    p = bytes(IPv6(src="2001:db8:9::1", dst=B6) / IPv6ExtHdrDestOpt(options=[HAO(hoa=HOA)]) / MIP6MH_BU(seq=7))
    info = pull_ip(p)
    s = pull_selectors(p)
    assert s.proto == 135 and s.mh_type == 5
    # ESP goes after the destination options header carrying the Home Address option
    assert info.esp_offset == info.l4_offset == 40 + 24
    assert p[info.nh_offset] == 135


def test_esp_goes_before_plain_dstopts_and_after_routing():
    p = bytes(
        IPv6(src=A6, dst=B6)
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrRouting(type=2, addresses=[HOA], segleft=1)
        / IPv6ExtHdrDestOpt()
        / UDP(sport=1, dport=2)
    )
    info = pull_ip(p)
    assert info.proto == 17
    hbh, rh2 = 8, 24
    assert info.esp_offset == 40 + hbh + rh2  # before the trailing dest opts
    assert p[info.nh_offset] == 60
    assert info.l4_offset == 40 + hbh + rh2 + 8


def test_non_first_fragment_has_no_ports():
    p = bytes(IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(offset=10, nh=17) / b"12345678")
    s = pull_selectors(p)
    assert s.sport is None and s.dport is None
    q = bytes(IP(src="10.0.0.1", dst="10.0.0.2", frag=10, proto=17) / b"12345678")
    assert pull_selectors(q).sport is None


def test_push_headers_match_scapy():
    h4 = push_ipv4_header(bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 50, 40, ttl=64, df=True)
    ref = IP(h4)
    assert ref.chksum == IP(bytes(IP(src="10.0.0.1", dst="10.0.0.2", proto=50, len=40, ttl=64, flags="DF", id=0))).chksum
    assert ipv4_checksum(h4) == 0
    h6 = push_ipv6_header(ipaddress.IPv6Address(A6).packed, ipaddress.IPv6Address(B6).packed, 41, 100, 64, 0x2E, 0x12345)
    r6 = IPv6(h6)
    assert (r6.src, r6.dst, r6.nh, r6.plen, r6.tc, r6.fl, r6.hlim) == (A6, B6, 41, 100, 0x2E, 0x12345, 64)


@pytest.mark.parametrize("data", [b"", b"\x45", b"\x60" + b"\x00" * 10, b"\x10" * 40, b"\x45" + b"\x00" * 19])
def test_malformed_raises_parse_error(data):
    with pytest.raises(ParseError):
        pull_selectors(data)


@given(st.binary(max_size=120))
def test_random_bytes_only_parse_error(data):
    try:
        pull_selectors(data)
    except ParseError:
        pass
