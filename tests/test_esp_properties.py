"""Hypothesis properties of bits/esp.py: round trips, and bad input never raises (typed drops)."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bits.sa import Lifetime
from bits.verdict import Drop, DropReason

from .test_esp_support import MODES, TRANSFORMS, find_esp, inner_packet, sa_pair

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
transforms = st.sampled_from(list(TRANSFORMS))
modes = st.sampled_from(list(MODES))
payloads = st.binary(max_size=1600)


def same_or_drop(result: bytes | Drop) -> bool:
    return isinstance(result, (bytes, Drop))


@SETTINGS
@given(
    transform=transforms,
    mode=modes,
    esn=st.booleans(),
    payloads=st.lists(payloads, min_size=1, max_size=6),
    start=st.sampled_from([0, 1000, 2**32 - 3, 2**33 + 7]),
)
def test_round_trip(transform: str, mode: str, esn: bool, payloads: list[bytes], start: int):
    if start >= 2**32 - 3 and not esn:
        start = 2**32 - 3 - len(payloads)
    out, inb = sa_pair(transform, mode, esn=esn, start_seq=start)
    if start:
        inb.replay.commit(start)  # the receiver has been following this sender
    originals = [inner_packet(mode, p) for p in payloads]
    sent = [out.encapsulate(o, 0.0) for o in originals]
    assert all(isinstance(p, bytes) for p in sent)
    for original, pkt in reversed(list(zip(originals, sent))):  # reordered, within the window
        assert inb.decapsulate(pkt, find_esp(pkt), 0.0) == original  # type: ignore[arg-type]
    assert inb.stats.packets == out.stats.packets == len(payloads)
    assert inb.stats.bytes == out.stats.bytes


@SETTINGS
@given(
    transform=transforms, mode=modes, data=st.binary(max_size=300), esp_offset=st.integers(-5, 120)
)
def test_random_bytes_never_raise(transform: str, mode: str, data: bytes, esp_offset: int) -> None:
    out, inb = sa_pair(transform, mode)
    assert same_or_drop(inb.decapsulate(data, esp_offset, 0.0))
    assert same_or_drop(out.encapsulate(data, 0.0))


@SETTINGS
@given(transform=transforms, body=st.binary(max_size=400), v6=st.booleans())
def test_random_esp_bodies_with_a_matching_spi_are_dropped(transform: str, body: bytes, v6: bool):
    """Past the cheap checks (right SPI, consistent IP length) random bytes reach the crypto:
    the verdict is a typed drop, never an exception and never a packet."""
    mode = "tunnel6in6" if v6 else "tunnel4in4"
    _, inb = sa_pair(transform, mode)
    esp = struct.pack("!II", 0x1001, 1) + body
    if v6:
        pkt = bytes([0x60, 0, 0, 0]) + struct.pack("!HBB", len(esp), 50, 64) + bytes(32) + esp
    else:
        head = bytes([0x45, 0]) + struct.pack("!H", 20 + len(esp)) + bytes(5) + b"\x32"
        pkt = head + bytes(10) + esp
    result = inb.decapsulate(pkt, 40 if v6 else 20, 0.0)
    assert isinstance(result, Drop)
    assert result.reason in (DropReason.MALFORMED, DropReason.AUTH_FAILED)


@SETTINGS
@given(transform=transforms, mode=modes, payload=payloads, data=st.data())
def test_mutated_packets_drop_or_decapsulate_never_raise(transform: str, mode: str, payload, data):
    out, inb = sa_pair(transform, mode)
    pkt = out.encapsulate(inner_packet(mode, payload), 0.0)
    assert isinstance(pkt, bytes)
    esp = find_esp(pkt)
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    buf = bytearray(pkt)
    if kind == "flip":
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del buf[data.draw(st.integers(0, len(buf) - 1)) :]
    else:
        buf += data.draw(st.binary(min_size=1, max_size=40))
    result = inb.decapsulate(bytes(buf), esp, 0.0)
    assert same_or_drop(result)
    if kind == "flip" and i >= esp:  # anything the ICV covers, or the ICV itself
        assert isinstance(result, Drop)


@SETTINGS
@given(
    transform=st.sampled_from(["gcm128", "gcm256", "chacha"]),
    ops=st.lists(
        st.tuples(st.integers(0, 30), st.sampled_from(["ok", "tamper", "ecn", "cut"])),
        min_size=1,
        max_size=40,
    ),
)
def test_fast_path_equals_generic_path(transform: str, ops: list[tuple[int, str]]) -> None:
    fast_out, fast_in = sa_pair(transform, "tunnel6in6", window=32)
    assert fast_in.decapsulate.__name__ == "_decap_fast6"
    pkts = [fast_out.encapsulate(inner_packet("tunnel6in6", bytes([i])), 0.0) for i in range(31)]
    _, slow_in = sa_pair(transform, "tunnel6in6", window=32)
    for index, op in ops:
        buf = bytearray(pkts[index])  # type: ignore[arg-type]
        if op == "tamper":
            buf[-3] ^= 4
        elif op == "ecn":
            buf[1] |= 0x30
        elif op == "cut":
            del buf[60:]
        assert fast_in.decapsulate(bytes(buf), 40, 0.0) == slow_in._decap(bytes(buf), 40, 0.0)
    assert fast_in.stats == slow_in.stats
    assert fast_in.replay.top == slow_in.replay.top
    assert fast_in.replay.bitmap == slow_in.replay.bitmap


@SETTINGS
@given(
    transform=st.sampled_from(["gcm128", "chacha"]),
    packets=st.lists(
        st.one_of(
            st.binary(max_size=40).map(lambda b: inner_packet("tunnel6in6", b)),  # all 4 pads
            st.binary(max_size=20).map(lambda b: inner_packet("tunnel4in6", b)),
            st.binary(max_size=50),  # garbage, short, non-IP
        ),
        min_size=1,
        max_size=12,
    ),
    soft=st.one_of(st.none(), st.integers(1, 8)),
    hard=st.one_of(st.none(), st.integers(1, 10)),
    soft_bytes=st.one_of(st.none(), st.integers(1, 500)),
    hard_bytes=st.one_of(st.none(), st.integers(1, 900)),
    start=st.sampled_from([0, 4090, 2**32 - 6]),
)
def test_fast_encapsulation_equals_generic_encapsulation(
    transform: str, packets: list[bytes], soft, hard, soft_bytes, hard_bytes, start: int
) -> None:
    """The outbound fast path (size table, folded sequence/packet-limit bound, bytes kept in the
    SA) against ``_encap_tunnel``: same bytes, drops, events, counters, across reservation
    blocks, lifetime limits and the end of the 32-bit space."""
    kw = dict(soft=Lifetime(soft_bytes, soft), hard=Lifetime(hard_bytes, hard), start_seq=start)
    fast, _ = sa_pair(transform, "tunnel6in6", **kw)
    slow, _ = sa_pair(transform, "tunnel6in6", **kw)
    assert fast.encapsulate.__name__ == "_encap_fast6"
    for p in packets:
        assert fast.encapsulate(p, 0.0) == slow._encap_tunnel(p, 0.0)
    assert fast.events == slow.events
    assert fast.stats == slow.stats
    assert fast.seq == slow.seq
    assert (fast.hard_expired, fast.soft_fired) == (slow.hard_expired, slow.soft_fired)
