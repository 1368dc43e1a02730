"""The per-packet fast paths agree with the general code they short-cut.

* ``bits.ip.pull_selectors`` reads plain IPv4 / IPv6 headers with one unpack; the answer (or the
  ParseError) must be the one ``selectors_from_info(packet, pull_ip(packet))`` gives.
* ``bits.ip.pull_esp_quick`` must agree with ``pull_ip`` + ``peek_spi_seq`` whenever it answers.
* ``bits.engine.Engine`` caches the inbound selector check per (SA, selectors): the policy hit
  counters and verdicts must stay those of ``PolicyDb.check_inbound``, also across SPD changes.
"""

from __future__ import annotations

import dataclasses
import os
import struct

from hypothesis import given, settings, strategies as st
from scapy.layers.inet import IP, UDP

from bits.errors import ParseError
from bits.esp import peek_spi_seq
from bits.ip import pull_esp_quick, pull_ip, pull_selectors, selectors_from_info
from bits.engine import build_engine
from bits.setkey import parse_setkey
from bits.verdict import Drop, DropReason

PROTOS = [0, 1, 6, 17, 41, 43, 44, 50, 58, 60, 132, 135, 136, 255]


def _general(packet: bytes) -> object:
    try:
        return selectors_from_info(packet, pull_ip(packet))
    except ParseError:
        return ParseError


def _fast(packet: bytes) -> object:
    try:
        return pull_selectors(packet)
    except ParseError:
        return ParseError


@st.composite
def ipv4_packets(draw: st.DrawFn) -> bytes:
    tail = draw(st.binary(min_size=0, max_size=40))
    ihl = draw(st.sampled_from([5, 5, 5, 4, 6, 15]))
    options = draw(st.binary(min_size=max(0, ihl * 4 - 20), max_size=max(0, ihl * 4 - 20)))
    size = 20 + len(options) + len(tail)
    total = draw(st.one_of(st.just(size), st.integers(0, 0xFFFF)))
    frag = draw(st.sampled_from([0, 0x4000, 0x2000, 0x0001, 0x2010, 0x1FFF]))
    head = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 7, frag, 64, draw(st.sampled_from(PROTOS)), 0,
                       draw(st.binary(min_size=4, max_size=4)), draw(st.binary(min_size=4, max_size=4)))
    return draw(st.sampled_from([head + options + tail, (head + options + tail)[: draw(st.integers(0, 30))]]))


@st.composite
def ipv6_packets(draw: st.DrawFn) -> bytes:
    tail = draw(st.binary(min_size=0, max_size=48))
    plen = draw(st.one_of(st.just(len(tail)), st.integers(0, 0xFFFF)))
    first = draw(st.sampled_from([0x60000000, 0x6FFFFFFF, 0x50000000]))
    head = struct.pack("!IHBB16s16s", first, plen, draw(st.sampled_from(PROTOS)), 64,
                       draw(st.binary(min_size=16, max_size=16)), draw(st.binary(min_size=16, max_size=16)))
    return draw(st.sampled_from([head + tail, (head + tail)[: draw(st.integers(0, 50))]]))


@settings(max_examples=600)
@given(st.one_of(ipv4_packets(), ipv6_packets(), st.binary(max_size=64)))
def test_pull_selectors_fast_path_equals_general_parse(packet: bytes) -> None:
    assert _fast(packet) == _general(packet)


@settings(max_examples=600)
@given(st.one_of(ipv4_packets(), ipv6_packets(), st.binary(max_size=64)))
def test_pull_esp_quick_agrees_with_pull_ip(packet: bytes) -> None:
    quick = pull_esp_quick(packet)
    if quick is None:
        return
    info = pull_ip(packet)  # never raises on what the quick path accepts
    assert info.proto == 50
    assert quick == (info.l4_offset, int.from_bytes(info.dst, "big"), *peek_spi_seq(packet, info.l4_offset))


A4, B4 = "192.0.2.1", "192.0.2.2"
KEY_AB = "0x" + "6a" * 16 + "01020304"
KEY_BA = "0x" + "6b" * 16 + "05060708"


def _pair() -> tuple:
    def node(me: str, peer: str, ko: str, ki: str, so: int, si: int):  # type: ignore[no-untyped-def]
        text = f"""
add {me} {peer} esp {so:#x} -m tunnel -dir out -E aes-gcm-16 {ko};
add {peer} {me} esp {si:#x} -m tunnel -dir in -E aes-gcm-16 {ki};
spdadd {me}/32 {peer}/32 udp -P out ipsec esp/tunnel/{me}-{peer}/require;
spdadd {peer}/32 {me}/32 udp -P in ipsec esp/tunnel/{peer}-{me}/require;
"""
        return build_engine(parse_setkey(text), rand=os.urandom, now=0.0)

    return node(A4, B4, KEY_AB, KEY_BA, 0x1001, 0x1002), node(B4, A4, KEY_BA, KEY_AB, 0x1002, 0x1001)


def _in_hits(engine) -> int:  # type: ignore[no-untyped-def]
    sa = engine.policy.sad.get_inbound(0x1001)
    return sum(engine.policy.spd.stats(e.name).hits for e in engine.policy.inbound_policies(sa))


def test_cached_inbound_check_counts_every_packet_like_check_inbound() -> None:
    a, b = _pair()
    pkt = bytes(IP(src=A4, dst=B4) / UDP(sport=1000, dport=2000) / (b"x" * 100))
    for _ in range(5):
        assert b.process_inbound(a.process_outbound(pkt, 1.0), 1.0) == pkt
    assert _in_hits(b) == 5 and b.counts["in_decapsulated"] == 5


def test_cached_inbound_mismatch_keeps_dropping() -> None:
    a, b = _pair()
    sa = a.policy.sad.get_outbound(0x1001)
    spoofed = bytes(IP(src="198.51.100.7", dst=B4) / UDP(sport=1, dport=2))
    for _ in range(3):
        d = b.process_inbound(sa.encapsulate(spoofed, 1.0), 1.0)
        assert isinstance(d, Drop) and d.reason is DropReason.SELECTOR_MISMATCH
    assert b.drops[DropReason.SELECTOR_MISMATCH] == 3 and _in_hits(b) == 0


def test_spd_change_flushes_the_inbound_check_cache() -> None:
    """After a flow was checked, a new IN policy ahead of the old one (serving the same SA)
    takes the hits: the cached answer must not survive the SPD change."""
    a, b = _pair()
    pkt = bytes(IP(src=A4, dst=B4) / UDP(sport=1000, dport=2000))
    assert b.process_inbound(a.process_outbound(pkt, 1.0), 1.0) == pkt
    old = b.policy.inbound_policies(b.policy.sad.get_inbound(0x1001))[0]
    b.policy.spd.add(dataclasses.replace(old, name="ahead"), before=old.name)
    assert b.process_inbound(a.process_outbound(pkt, 1.0), 1.0) == pkt
    assert b.policy.spd.stats("ahead").hits == 1 and b.policy.spd.stats(old.name).hits == 1
