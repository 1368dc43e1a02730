"""SecurityAssociation behaviour (bits/esp.py): headers, drops, sequence numbers, lifetimes."""

from __future__ import annotations

import dataclasses
import os
import struct

import pytest

from bits.constants import MAX_SEQ32, MAX_SEQ64, Direction
from bits.errors import BitsError, ConfigError, ParseError
from bits.esp import SaLifetimeEvent, SecurityAssociation, peek_spi_seq
from bits.ip import ipv4_checksum
from bits.sa import Lifetime
from bits.transforms import trailer
from bits.verdict import Drop, DropReason

from .test_esp_support import A4, A6, B4, B6, TRANSFORMS, find_esp, inner_packet, sa_pair, sa_params


def drop_reason(result: bytes | Drop) -> DropReason | None:
    return result.reason if isinstance(result, Drop) else None


def reseal(out: SecurityAssociation, plaintext: bytes, outer: bytes) -> bytes:
    """A tunnel-mode IPv6 ESP packet whose padded plaintext we choose (to build bad trailers)."""
    out.seq += 1
    esp = out.transform.seal(out.spi, out.seq, plaintext)
    return outer[:4] + struct.pack("!H", len(esp)) + outer[6:40] + esp


# --- tunnel mode: outer header (RFC 4301 section 5.1.2) ------------------------------------------


def test_tunnel_6in6_outer_header_copies_class_and_flow_label() -> None:
    out, inb = sa_pair("gcm128", "tunnel6in6")
    inner = inner_packet("tunnel6in6")
    pkt = out.encapsulate(inner, 0.0)
    assert isinstance(pkt, bytes)
    assert pkt[:4] == inner[:4]  # version 6, traffic class 0xb9 (DSCP + ECN), flow label 0x12345
    assert struct.unpack("!H", pkt[4:6])[0] == len(pkt) - 40
    assert pkt[6] == 50 and pkt[7] == 64  # Next Header ESP, fresh hop limit
    assert pkt[8:24] == A6.packed and pkt[24:40] == B6.packed
    assert peek_spi_seq(pkt, 40) == (0x1001, 1)
    assert inb.decapsulate(pkt, 40, 0.0) == inner


def test_tunnel_4in6_outer_class_from_inner_tos() -> None:
    out, inb = sa_pair("cbc", "tunnel4in6")
    inner = inner_packet("tunnel4in6")
    pkt = out.encapsulate(inner, 0.0)
    assert isinstance(pkt, bytes)
    assert struct.unpack("!I", pkt[:4])[0] == 0x60000000 | 0xB9 << 20  # flow label 0
    assert inb.decapsulate(pkt, 40, 0.0) == inner


@pytest.mark.parametrize(
    "mode,inner_df", [("tunnel4in4", True), ("tunnel4in4", False), ("tunnel6in4", False)]
)
def test_tunnel_ipv4_outer_header(mode: str, inner_df: bool) -> None:
    out, inb = sa_pair("null", mode)
    inner = bytearray(inner_packet(mode))
    if mode == "tunnel4in4" and not inner_df:
        inner[6] &= ~0x40
        inner[10:12] = b"\0\0"
        inner[10:12] = struct.pack("!H", ipv4_checksum(bytes(inner[:20])))
    inner = bytes(inner)
    for seq in (1, 2):
        pkt = out.encapsulate(inner, 0.0)
        assert isinstance(pkt, bytes)
        assert pkt[0] == 0x45 and pkt[1] == 0xB9  # TOS / traffic class copied (DSCP + ECN)
        assert struct.unpack("!H", pkt[2:4])[0] == len(pkt)
        assert struct.unpack("!H", pkt[4:6])[0] == seq  # Identification: low bits of the seq
        assert pkt[6] & 0x40 == (0x40 if inner_df else 0)  # DF copied from IPv4, clear for IPv6
        assert pkt[8] == 64 and pkt[9] == 50
        assert ipv4_checksum(pkt[:20]) == 0
        assert pkt[12:16] == A4.packed and pkt[16:20] == B4.packed
        assert inb.decapsulate(pkt, 20, 0.0) == inner


# --- transport mode (RFC 4303 section 3.1.1) ------------------------------------------------------


def test_transport_ipv4_fixes_protocol_length_and_checksum() -> None:
    out, inb = sa_pair("gcm256", "transport4")
    orig = inner_packet("transport4")
    pkt = out.encapsulate(orig, 0.0)
    assert isinstance(pkt, bytes)
    assert pkt[:2] == orig[:2] and pkt[4:9] == orig[4:9]  # TOS, ident, flags, TTL kept
    assert pkt[9] == 50 and struct.unpack("!H", pkt[2:4])[0] == len(pkt)
    assert ipv4_checksum(pkt[:20]) == 0
    assert inb.decapsulate(pkt, 20, 0.0) == orig


def test_transport_ipv6_after_routing_header_and_home_address_option() -> None:
    out, inb = sa_pair("null", "transport6-mip")
    orig = inner_packet("transport6-mip")
    pkt = out.encapsulate(orig, 0.0)
    assert isinstance(pkt, bytes)
    esp = 40 + 24 + 24  # RH2 and the Home Address destination option stay in front of ESP
    assert find_esp(pkt) == esp
    assert pkt[6] == 43 and pkt[40] == 60 and pkt[64] == 50  # ... | DestOpt(NH=50) | ESP
    assert pkt[:esp][:4] == orig[:4] and pkt[8:esp] != b"" and pkt[41:64] == orig[41:64]
    assert struct.unpack("!H", pkt[4:6])[0] == len(pkt) - 40
    # NULL encryption: the MH is visible, and the ESP Next Header is the MH's (135)
    assert pkt[esp + 8 : esp + 8 + len(orig) - esp] == orig[esp:]
    assert pkt[-17] == 135
    assert inb.decapsulate(pkt, esp, 0.0) == orig


def test_transport_ipv6_fragment_is_refused() -> None:
    out, _ = sa_pair("gcm128", "transport6")
    fixed = bytes.fromhex("6000000000102c40") + A6.packed + B6.packed
    frag = fixed + bytes.fromhex("1100000100000001") + bytes(8)  # offset 0, M=1
    assert drop_reason(out.encapsulate(frag, 0.0)) is DropReason.FRAGMENT
    assert out.seq == 0


# --- decapsulation drops --------------------------------------------------------------------


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_replayed_and_old_packets_are_dropped(transform: str) -> None:
    out, inb = sa_pair(transform, "tunnel6in6", window=32)
    pkts = [out.encapsulate(inner_packet("tunnel6in6"), 0.0) for _ in range(40)]
    assert isinstance(inb.decapsulate(pkts[0], 40, 0.0), bytes)
    dup = inb.decapsulate(pkts[0], 40, 0.0)
    assert isinstance(dup, Drop) and dup.reason is DropReason.REPLAY and dup.detail == "duplicate"
    assert dup.seq == 1 and dup.spi == 0x1001
    assert isinstance(inb.decapsulate(pkts[39], 40, 0.0), bytes)  # seq 40: window [9, 40]
    old = inb.decapsulate(pkts[7], 40, 0.0)  # seq 8
    assert isinstance(old, Drop) and old.detail == "too-old"
    assert isinstance(inb.decapsulate(pkts[8], 40, 0.0), bytes)  # seq 9, the left edge
    assert inb.stats.replay_drops == 2 and inb.stats.packets == 3


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("where", ["spi", "seq", "iv-or-payload", "ciphertext", "icv"])
def test_modified_octet_fails_authentication_and_keeps_the_window(transform: str, where: str):
    out, inb = sa_pair(transform, "tunnel6in6")
    pkt = out.encapsulate(inner_packet("tunnel6in6"), 0.0)
    assert isinstance(pkt, bytes)
    end = len(pkt)
    offsets = {"spi": 43, "seq": 47, "iv-or-payload": 50, "ciphertext": end - 20, "icv": end - 1}
    index = offsets[where]
    bad = bytearray(pkt)
    bad[index] ^= 0x40
    if where == "spi":  # the engine would not find the SA; called anyway, it says so
        assert drop_reason(inb.decapsulate(bytes(bad), 40, 0.0)) is DropReason.UNKNOWN_SPI
        return
    result = inb.decapsulate(bytes(bad), 40, 0.0)
    assert drop_reason(result) is DropReason.AUTH_FAILED
    assert inb.stats.auth_failures == 1
    assert (inb.replay.top, inb.replay.bitmap) == (0, 0)  # a forgery never moves the window
    assert isinstance(inb.decapsulate(pkt, 40, 0.0), bytes)


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_bad_padding_is_dropped_after_authentication(transform: str) -> None:
    out, inb = sa_pair(transform, "tunnel6in6")
    inner = inner_packet("tunnel6in6")
    outer = out.encapsulate(inner, 0.0)
    assert isinstance(outer, bytes)
    good = inner + trailer(out.transform, len(inner), 41)
    pad = good[-2]
    variants = [
        good[:-3] + bytes([good[-3] ^ 0xFF]) + good[-2:] if pad else None,  # wrong padding content
        inner + bytes(pad) + bytes([len(inner) + pad + 1, 41]),  # Pad Length beyond the payload
    ]
    for plaintext in filter(None, variants):
        pkt = reseal(out, plaintext, outer)
        assert drop_reason(inb.decapsulate(pkt, 40, 0.0)) is DropReason.BAD_PADDING
        assert inb.replay.top == out.seq  # authentic, so the window did move


def test_wrong_next_header_in_tunnel_mode() -> None:
    out, inb = sa_pair("gcm128", "tunnel6in6")
    inner = inner_packet("tunnel6in6")
    outer = out.encapsulate(inner, 0.0)
    pkt = reseal(out, inner + trailer(out.transform, len(inner), 17), outer)
    result = inb.decapsulate(pkt, 40, 0.0)
    assert isinstance(result, Drop)
    assert result.reason is DropReason.BAD_NEXT_HEADER and result.detail == "17"


def test_inner_header_must_match_the_next_header() -> None:
    out, inb = sa_pair("gcm128", "tunnel6in6")
    inner4 = inner_packet("tunnel4in6")
    outer = out.encapsulate(inner4, 0.0)
    pkt = reseal(out, inner4 + trailer(out.transform, len(inner4), 41), outer)  # says IPv6
    assert drop_reason(inb.decapsulate(pkt, 40, 0.0)) is DropReason.MALFORMED


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_dummy_packets_are_dropped_and_counted(transform: str) -> None:
    """RFC 4303 section 2.6: Next Header 59 is a dummy; it authenticates, then is discarded."""
    out, inb = sa_pair(transform, "tunnel6in6")
    outer = out.encapsulate(inner_packet("tunnel6in6"), 0.0)
    pkt = reseal(out, os.urandom(6) + trailer(out.transform, 6, 59), outer)
    assert drop_reason(inb.decapsulate(pkt, 40, 0.0)) is DropReason.DUMMY
    assert inb.stats.other_drops == 1 and inb.replay.top == out.seq


def test_tfc_padding_after_the_inner_packet_is_removed() -> None:
    """RFC 4303 section 2.4: the receiver cuts the inner packet to its own length."""
    out, inb = sa_pair("chacha", "tunnel6in6")
    inner = inner_packet("tunnel6in6")
    outer = out.encapsulate(inner, 0.0)
    padded = inner + bytes(100)
    pkt = reseal(out, padded + trailer(out.transform, len(padded), 41), outer)
    assert inb.decapsulate(pkt, 40, 0.0) == inner


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_truncated_packets_are_malformed_never_exceptions(transform: str) -> None:
    out, inb = sa_pair(transform, "tunnel6in6")
    pkt = out.encapsulate(inner_packet("tunnel6in6"), 0.0)
    assert isinstance(pkt, bytes)
    for n in range(len(pkt)):
        cut = bytearray(pkt[:n])
        if n >= 6:
            cut[4:6] = struct.pack("!H", max(n - 40, 0))  # consistent IPv6 length: ESP itself short
        result = inb.decapsulate(bytes(cut), 40, 0.0)
        assert isinstance(result, Drop), n
        assert result.reason in (DropReason.MALFORMED, DropReason.AUTH_FAILED), (n, result)
    for esp_offset in (-1, 0, 39, len(pkt), len(pkt) + 10):
        assert isinstance(inb.decapsulate(pkt, esp_offset, 0.0), Drop)
    assert drop_reason(inb.decapsulate(b"", 40, 0.0)) is DropReason.MALFORMED


def test_cbc_ciphertext_must_be_whole_blocks() -> None:
    out, inb = sa_pair("cbc", "tunnel6in6")
    pkt = out.encapsulate(inner_packet("tunnel6in6"), 0.0)
    assert isinstance(pkt, bytes)
    odd = bytearray(pkt[:-16] + bytes(4) + pkt[-16:])
    odd[4:6] = struct.pack("!H", len(odd) - 40)
    result = inb.decapsulate(bytes(odd), 40, 0.0)
    assert isinstance(result, Drop)
    assert result.reason is DropReason.MALFORMED and result.detail == "ESP length"


def test_ip_length_beyond_the_packet_is_malformed() -> None:
    out, inb = sa_pair("gcm128", "tunnel6in6")
    pkt = bytearray(out.encapsulate(inner_packet("tunnel6in6"), 0.0))  # type: ignore[arg-type]
    pkt[4:6] = struct.pack("!H", len(pkt))  # 40 octets longer than what arrived
    assert drop_reason(inb.decapsulate(bytes(pkt), 40, 0.0)) is DropReason.MALFORMED


def test_transport_header_chain_must_lead_to_esp() -> None:
    out, inb = sa_pair("gcm128", "transport6-mip")
    pkt = out.encapsulate(inner_packet("transport6-mip"), 0.0)
    assert isinstance(pkt, bytes)
    assert drop_reason(inb.decapsulate(pkt, 64, 0.0)) is DropReason.MALFORMED  # inside a header
    assert isinstance(inb.decapsulate(pkt, 88, 0.0), bytes)


def test_encapsulate_rejects_garbage_without_consuming_a_sequence_number() -> None:
    for mode in ("tunnel6in6", "transport6", "transport4"):
        out, _ = sa_pair("gcm128", mode)
        for junk in (b"", b"\x60", b"\x45" + bytes(10), b"\x70" + bytes(60), b"\x60" + bytes(30)):
            assert drop_reason(out.encapsulate(junk, 0.0)) is DropReason.MALFORMED, (mode, junk)
        assert out.seq == 0


def test_too_big_results_are_dropped() -> None:
    out, _ = sa_pair("gcm128", "tunnel6in6")
    inner = inner_packet("tunnel6in6")
    big = bytearray(inner + bytes(65535 - len(inner)))  # the largest IPv6 packet: no room for ESP
    big[4:6] = struct.pack("!H", len(big) - 40)
    assert drop_reason(out.encapsulate(bytes(big), 0.0)) is DropReason.TOO_BIG
    assert out.seq == 0


# --- ECN at decapsulation (RFC 6040 section 4.2) --------------------------------------------


@pytest.mark.parametrize(
    "inner_ecn,outer_ecn,expected",
    [(2, 3, 3), (1, 3, 3), (2, 1, 1), (1, 2, 1), (3, 1, 3), (0, 2, 0), (0, 1, 0), (0, 3, None),
     (2, 0, 2)],
)
@pytest.mark.parametrize("mode", ["tunnel6in6", "tunnel4in6", "tunnel6in4"])
def test_outer_ecn_is_folded_into_the_inner_packet(mode: str, inner_ecn, outer_ecn, expected):
    out, inb = sa_pair("gcm128", mode)
    inner = bytearray(inner_packet(mode))
    if inner[0] >> 4 == 6:
        inner[1] = (inner[1] & 0xCF) | inner_ecn << 4
    else:
        inner[1] = (inner[1] & 0xFC) | inner_ecn
        inner[10:12] = b"\0\0"
        inner[10:12] = struct.pack("!H", ipv4_checksum(bytes(inner[:20])))
    pkt = bytearray(out.encapsulate(bytes(inner), 0.0))  # type: ignore[arg-type]
    if pkt[0] >> 4 == 6:  # a router on the path marks the outer header
        pkt[1] = (pkt[1] & 0xCF) | outer_ecn << 4
    else:
        pkt[1] = (pkt[1] & 0xFC) | outer_ecn
    result = inb.decapsulate(bytes(pkt), find_esp(bytes(pkt)), 0.0)
    if expected is None:
        assert drop_reason(result) is DropReason.MALFORMED
        return
    assert isinstance(result, bytes)
    ecn = (result[1] >> 4) & 3 if result[0] >> 4 == 6 else result[1] & 3
    assert ecn == expected
    if result[0] >> 4 == 4:
        assert ipv4_checksum(result[:20]) == 0
    assert result[2:] == bytes(inner[2:]) or result[0] >> 4 == 4


# --- sequence numbers --------------------------------------------------------------------------


def test_32bit_counter_never_wraps() -> None:
    out, inb = sa_pair("gcm128", "tunnel6in6", start_seq=MAX_SEQ32 - 1, window=64)
    inb.replay.commit(MAX_SEQ32 - 10)  # the peer has seen us before
    last = out.encapsulate(inner_packet("tunnel6in6"), 0.0)
    assert peek_spi_seq(last, 40) == (0x1001, MAX_SEQ32)  # type: ignore[arg-type]
    d = out.encapsulate(inner_packet("tunnel6in6"), 0.0)
    assert isinstance(d, Drop) and d.reason is DropReason.SEQ_EXHAUSTED and d.seq == MAX_SEQ32 + 1
    assert out.seq == MAX_SEQ32 and out.stats.other_drops == 1
    assert isinstance(inb.decapsulate(last, 40, 0.0), bytes)


def test_esn_counter_never_wraps() -> None:
    out, _ = sa_pair("cbc", "tunnel6in6", start_seq=MAX_SEQ64 - 1, esn=True)
    assert isinstance(out.encapsulate(inner_packet("tunnel6in6"), 0.0), bytes)
    assert drop_reason(out.encapsulate(inner_packet("tunnel6in6"), 0.0)) is DropReason.SEQ_EXHAUSTED


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_esn_sa_crosses_2_pow_32(transform: str) -> None:
    out, inb = sa_pair(transform, "tunnel4in6", start_seq=2**32 - 4, esn=True)
    inb.replay.commit(2**32 - 20)
    inner = inner_packet("tunnel4in6")
    pkts = [out.encapsulate(inner, 0.0) for _ in range(8)]
    wire = [peek_spi_seq(p, 40)[1] for p in pkts]  # type: ignore[arg-type]
    assert wire == [2**32 - 3, 2**32 - 2, 2**32 - 1, 0, 1, 2, 3, 4]
    for p in pkts[:3] + pkts[4:] + pkts[3:4]:  # one packet late across the boundary
        assert inb.decapsulate(p, 40, 0.0) == inner
    assert inb.replay.top == 2**32 + 4
    assert drop_reason(inb.decapsulate(pkts[2], 40, 0.0)) is DropReason.REPLAY


def test_encapsulate_on_an_inbound_sa_is_a_bug() -> None:
    _, inb = sa_pair("gcm128", "tunnel6in6")
    with pytest.raises(BitsError):
        inb.encapsulate(inner_packet("tunnel6in6"), 0.0)


def test_peek_spi_seq() -> None:
    out, _ = sa_pair("gcm128", "tunnel6in6", spi=0xDEADBEEF, start_seq=41)
    pkt = out.encapsulate(inner_packet("tunnel6in6"), 0.0)
    assert peek_spi_seq(pkt, 40) == (0xDEADBEEF, 42)  # type: ignore[arg-type]
    for bad in (pkt[:47], b""):
        with pytest.raises(ParseError):
            peek_spi_seq(bad, 40)
    with pytest.raises(ParseError):
        peek_spi_seq(pkt, -8)


# --- lifetimes (RFC 4301 section 4.4.2.1) ---------------------------------------------------------


def test_packet_lifetimes_soft_then_hard() -> None:
    out, _ = sa_pair("gcm128", "tunnel6in6", soft=Lifetime(packets=2), hard=Lifetime(packets=3))
    inner = inner_packet("tunnel6in6")
    assert isinstance(out.encapsulate(inner, 0.0), bytes)
    assert out.events == []
    assert isinstance(out.encapsulate(inner, 0.0), bytes)
    assert out.events == [SaLifetimeEvent(0x1001, "soft", "packets")]
    assert isinstance(out.encapsulate(inner, 0.0), bytes)  # the one reaching the hard limit passes
    assert out.events[-1] == SaLifetimeEvent(0x1001, "hard", "packets") and out.hard_expired
    d = out.encapsulate(inner, 0.0)
    assert isinstance(d, Drop) and d.reason is DropReason.SA_EXPIRED
    assert out.seq == 3 and len(out.events) == 2


def test_byte_lifetimes_count_cleartext_payload() -> None:
    out, inb = sa_pair("cbc", "tunnel6in6", soft=Lifetime(bytes=150), hard=Lifetime(bytes=250))
    inner = inner_packet("tunnel6in6", payload=bytes(52))  # 40 + 8 + 52 = 100 octets
    assert len(inner) == 100
    pkts = [out.encapsulate(inner, 0.0) for _ in range(4)]
    assert [type(p) for p in pkts] == [bytes, bytes, bytes, Drop]
    assert out.events == [
        SaLifetimeEvent(0x1001, "soft", "bytes"), SaLifetimeEvent(0x1001, "hard", "bytes")
    ]
    assert out.stats.bytes == 300
    # the inbound SA has the same limits and counts the same octets
    results = [inb.decapsulate(p, 40, 0.0) for p in pkts[:3]]
    assert results[:2] == [inner, inner] and results[2] == inner and inb.hard_expired
    assert drop_reason(inb.decapsulate(pkts[0], 40, 0.0)) is DropReason.SA_EXPIRED


def test_byte_lifetimes_on_the_fast_path_fire_exactly_at_the_limit() -> None:
    out, _ = sa_pair("gcm128", "tunnel6in6", soft=Lifetime(bytes=200), hard=Lifetime(bytes=300))
    assert out.encapsulate.__name__ == "_encap_fast6"
    inner = inner_packet("tunnel6in6", payload=bytes(52))
    assert isinstance(out.encapsulate(inner, 0.0), bytes) and out.events == []
    assert isinstance(out.encapsulate(inner, 0.0), bytes)  # 200 octets: the soft limit
    assert out.events == [SaLifetimeEvent(0x1001, "soft", "bytes")]
    assert isinstance(out.encapsulate(inner, 0.0), bytes)  # 300: hard, this one still passes
    assert out.events[-1] == SaLifetimeEvent(0x1001, "hard", "bytes") and out.hard_expired
    assert drop_reason(out.encapsulate(inner, 0.0)) is DropReason.SA_EXPIRED
    assert (out.stats.packets, out.stats.bytes, out.seq) == (3, 300, 3)


def test_seconds_lifetimes_and_timers() -> None:
    soft, hard = Lifetime(seconds=10), Lifetime(seconds=30)
    out, _ = sa_pair("gcm128", "tunnel6in6", now=100.0, soft=soft, hard=hard)
    inner = inner_packet("tunnel6in6")
    assert out.added_at == 100.0 and out.next_timer() == 110.0
    out.handle_timer(109.9)
    assert out.events == []
    out.handle_timer(110.0)
    assert out.events == [SaLifetimeEvent(0x1001, "soft", "seconds")] and out.next_timer() == 130.0
    assert isinstance(out.encapsulate(inner, 129.0), bytes)
    # a packet after the hard deadline is refused even if the timer has not been handled yet
    assert drop_reason(out.encapsulate(inner, 130.5)) is DropReason.SA_EXPIRED
    assert out.events[-1] == SaLifetimeEvent(0x1001, "hard", "seconds")
    assert out.next_timer() is None
    out.handle_timer(500.0)
    assert len(out.events) == 2


def test_hard_limit_first_suppresses_the_soft_event() -> None:
    out, _ = sa_pair("gcm128", "tunnel6in6", soft=Lifetime(seconds=50), hard=Lifetime(seconds=20))
    out.handle_timer(60.0)
    assert out.events == [SaLifetimeEvent(0x1001, "hard", "seconds")]


def test_no_limits_no_timer() -> None:
    out, _ = sa_pair()
    assert out.next_timer() is None
    out.handle_timer(1e12)
    assert out.events == [] and not out.hard_expired


# --- the fast path is the generic path, faster ---------------------------------------------


def test_fast_path_is_bound_only_where_it_applies() -> None:
    bound = {name: sa_pair(name, "tunnel6in6")[0].encapsulate.__name__ for name in TRANSFORMS}
    fast = {name for name, method in bound.items() if method == "_encap_fast6"}
    assert fast == {"gcm128", "gcm256", "chacha"}
    assert sa_pair("gcm128", "tunnel6in6", esn=True)[0].encapsulate.__name__ == "_encap_tunnel"
    assert sa_pair("gcm128", "tunnel6in4")[1].decapsulate.__name__ == "_decap"


@pytest.mark.parametrize("mode", ["tunnel6in6", "tunnel4in6"])
def test_fast_and_generic_paths_agree(mode: str) -> None:
    fast_out, fast_in = sa_pair("gcm256", mode, window=32)
    slow_out, slow_in = sa_pair("gcm256", mode, window=32)
    inner = inner_packet(mode)
    pkts = []
    for _ in range(50):
        a, b = fast_out.encapsulate(inner, 0.0), slow_out._encap_tunnel(inner, 0.0)
        assert a == b
        pkts.append(a)
    tampered = bytearray(pkts[3])
    tampered[-1] ^= 1
    ecn = bytearray(pkts[5])
    ecn[1] |= 0x30
    stream = [pkts[0], pkts[2], pkts[1], pkts[2], bytes(tampered), pkts[3], bytes(ecn), pkts[49],
              pkts[4], b"", pkts[6]]
    for p in stream:
        assert fast_in.decapsulate(p, 40, 0.0) == slow_in._decap(p, 40, 0.0)
    assert fast_in.stats == slow_in.stats
    assert fast_in.replay.top == slow_in.replay.top
    assert fast_in.replay.bitmap == slow_in.replay.bitmap


def test_repr_shows_no_key_material() -> None:
    out, _ = sa_pair("cbc", "tunnel6in6")
    text = repr(out) + repr(out.params)
    for secret in (TRANSFORMS["cbc"][1], TRANSFORMS["cbc"][3]):
        assert secret.hex() not in text and repr(secret) not in text
    assert "0x00001001" in repr(out)


def test_stats_count_what_was_protected() -> None:
    out, inb = sa_pair("gcm128", "transport6")
    orig = inner_packet("transport6")
    for _ in range(3):
        pkt = out.encapsulate(orig, 0.0)
        assert isinstance(pkt, bytes) and inb.decapsulate(pkt, 40, 0.0) == orig
    assert out.stats.packets == inb.stats.packets == 3
    assert out.stats.bytes == inb.stats.bytes == 3 * (len(orig) - 40)


def test_mixed_address_families_are_a_config_error() -> None:
    p = dataclasses.replace(sa_params("gcm128", "tunnel6in6"), dst=B4)
    with pytest.raises(ConfigError, match="IP versions differ"):
        SecurityAssociation(p, rand=os.urandom, now=0.0)
