"""Batched NFQUEUE verdicts (bits.io.nfqueue.VerdictBatch) without a kernel (no root).

The messages are decoded here field by field as linux/netfilter/nfnetlink_queue.h lays them out;
tests/test_netns_nfqueue.py runs the same code against real queues.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

import pytest

from bits.io.nfqueue import (
    ACCEPTED,
    DROPPED,
    ERRORS,
    MODIFIED,
    NF_ACCEPT,
    NF_DROP,
    VerdictBatch,
    make_callback,
    split_messages,
)
from bits.trace import Tracer
from bits.verdict import Drop, DropReason


@dataclass
class Pkt:
    """What the batch needs of a netfilterqueue.Packet: the kernel's id (and the payload)."""

    id: int
    payload: bytes = b"\x45" + b"\0" * 27

    def get_payload(self) -> bytes:
        return self.payload


def decode(message: bytes) -> tuple[int, int, int, bytes | None]:
    """(queue, verdict, packet id, payload or None) of one verdict message; checks the framing."""
    length, mtype, flags, seq, portid = struct.unpack_from("=IHHII", message)
    assert length == len(message) and mtype == (3 << 8) | 1 and flags == 1 and (seq, portid) == (0, 0)
    family, version, queue = struct.unpack_from("!BBH", message, 16)
    assert (family, version) == (socket.AF_UNSPEC, 0)
    alen, atype = struct.unpack_from("=HH", message, 20)
    assert (alen, atype) == (12, 2)  # NFQA_VERDICT_HDR
    verdict, packet_id = struct.unpack_from("!II", message, 24)
    if length == 32:
        return queue, verdict, packet_id, None
    plen, ptype = struct.unpack_from("=HH", message, 32)
    assert ptype == 10 and plen == length - 32  # NFQA_PAYLOAD, the last attribute
    return queue, verdict, packet_id, message[36:]


class Sink:
    def __init__(self, fail_batches: bool = False) -> None:
        self.calls: list[list[bytes]] = []
        self.fail_batches = fail_batches

    def __call__(self, buffers: list[bytes]) -> int:
        if self.fail_batches and len(split_messages(b"".join(buffers))) > 1:
            raise OSError(105, "No buffer space available")
        self.calls.append(list(buffers))
        return sum(map(len, buffers))

    def messages(self) -> list[tuple[int, int, int, bytes | None]]:
        return [decode(m) for call in self.calls for m in split_messages(b"".join(call))]


def test_verdicts_encode_queue_verdict_id_and_payload() -> None:
    sink = Sink()
    batch = VerdictBatch(sink, queue=513, limit=8)
    batch.add(Pkt(7), NF_ACCEPT)
    batch.add(Pkt(8), NF_DROP)
    batch.add(Pkt(0xFFFFFFFF), NF_ACCEPT, b"ESP" + b"x" * 1450)  # 1453: three octets of padding
    batch.add(Pkt(10), NF_ACCEPT, b"abcd")
    assert sink.calls == []  # nothing sent before the flush
    batch.flush()
    assert len(sink.calls) == 1 and batch.sends == 1
    assert sink.messages() == [
        (513, NF_ACCEPT, 7, None),
        (513, NF_DROP, 8, None),
        (513, NF_ACCEPT, 0xFFFFFFFF, b"ESP" + b"x" * 1450),
        (513, NF_ACCEPT, 10, b"abcd"),
    ]
    data = b"".join(sink.calls[0])
    assert len(data) % 4 == 0  # every message starts aligned (NLMSG_ALIGN)


def test_full_batch_is_sent_at_once_and_flush_of_nothing_sends_nothing() -> None:
    sink = Sink()
    batch = VerdictBatch(sink, queue=0, limit=3)
    for i in range(7):
        batch.add(Pkt(i), NF_ACCEPT, b"p%d" % i)
    assert [len(split_messages(b"".join(c))) for c in sink.calls] == [3, 3]
    batch.flush()
    batch.flush()
    assert [m[2] for m in sink.messages()] == list(range(7)) and batch.sends == 3


def test_failed_batch_is_retried_one_message_at_a_time() -> None:
    sink = Sink(fail_batches=True)
    batch = VerdictBatch(sink, queue=1, limit=16)
    for i in range(4):
        batch.add(Pkt(i), NF_ACCEPT if i % 2 else NF_DROP, None if i % 2 else b"q" * i)
    batch.flush()
    assert [m[1:3] for m in sink.messages()] == [(NF_DROP, 0), (NF_ACCEPT, 1), (NF_DROP, 2), (NF_ACCEPT, 3)]
    assert batch.send_errors == 0


def test_oversized_payload_is_refused_before_anything_is_queued() -> None:
    sink = Sink()
    batch = VerdictBatch(sink, queue=1)
    with pytest.raises(ValueError):
        batch.add(Pkt(1), NF_ACCEPT, b"x" * 0x10000)
    batch.flush()
    assert sink.calls == []


def _run(result: object) -> tuple[list[int], list[tuple[int, int, int, bytes | None]]]:
    sink = Sink()
    batch = VerdictBatch(sink, queue=4, limit=1)
    counts = [0] * 4
    cb, _ = make_callback(lambda p, now: result(p) if callable(result) else result, counts, Tracer(), 4,
                          lambda exc, q: None, verdict=batch.add)
    cb(Pkt(99))
    return counts, sink.messages()


def test_callback_with_batch_accepts_unchanged_without_payload() -> None:
    counts, msgs = _run(lambda p: p)
    assert msgs == [(4, NF_ACCEPT, 99, None)] and counts[ACCEPTED] == 1


def test_callback_with_batch_sends_the_new_packet() -> None:
    counts, msgs = _run(bytearray(b"new packet"))
    assert msgs == [(4, NF_ACCEPT, 99, b"new packet")] and counts[MODIFIED] == 1


@pytest.mark.parametrize("result", [Drop(DropReason.REPLAY, 1, 2), b"", None])
def test_callback_with_batch_drops(result: object) -> None:
    counts, msgs = _run(result)
    assert msgs == [(4, NF_DROP, 99, None)] and counts[DROPPED] == 1


def test_callback_with_batch_drops_on_error_and_on_unsendable_result() -> None:
    def boom(p: bytes) -> bytes:
        raise ValueError("bug")

    for result in (boom, {"not": "bytes"}, b"x" * 0x10000):
        counts, msgs = _run(result)
        assert msgs == [(4, NF_DROP, 99, None)] and counts[ERRORS] == 1
