#!/usr/bin/env python3
"""Minimal NFQUEUE pass-through (path (b) of scripts/bench): accept every packet, nothing else.

    nfq-accept.py QUEUE                     the floor: bind QUEUE, accept each packet
    nfq-accept.py QUEUE --batch             the same, verdicts batched as bits.io.nfqueue sends them
                                            (up to VERDICT_BATCH per sendmsg, flushed when drained)
    nfq-accept.py QUEUE --adapter OUT|IN    the same traffic through bits.io.nfqueue.Processor and a
                                            pass-through engine (returns the packet object): the
                                            adapter's own cost, without any ESP
        [--trace off|drops|all --trace-path FILE]   ... and the cost of tracing every packet

Runs until SIGTERM/SIGINT. Needs root and the netfilterqueue package (the repo's .venv has it).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def accept_loop(queue: int) -> int:
    from netfilterqueue import NetfilterQueue

    nfq = NetfilterQueue()
    nfq.bind(queue, lambda pkt: pkt.accept(), max_len=4096)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        nfq.run()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        nfq.unbind()
    return 0


def batched_accept_loop(queue: int) -> int:
    import select

    from netfilterqueue import NetfilterQueue

    from bits.io.nfqueue import NF_ACCEPT, VerdictBatch

    nfq = NetfilterQueue()
    sock = socket.socket(fileno=os.dup(nfq.get_fd()))  # the queue's own netlink socket
    batch = VerdictBatch(sock.sendmsg, queue)
    add = batch.add
    nfq.bind(queue, lambda pkt: add(pkt, NF_ACCEPT), max_len=4096)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fd = nfq.get_fd()
    try:
        while True:
            select.select([fd], [], [])
            nfq.run(block=False)
            batch.flush()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        batch.flush()
        nfq.unbind()
        sock.close()
    return 0


class PassThrough:
    """Accepts everything as the same object; traces like bits.engine does on BYPASS."""

    def __init__(self, tracer) -> None:  # type: ignore[no-untyped-def]
        self.tracer = tracer
        self.packets = 0

    def _pass(self, packet: bytes, now: float) -> bytes:
        if self.tracer.wants_all:
            v4 = packet[0] >> 4 == 4
            src, dst = (packet[12:16], packet[16:20]) if v4 else (packet[8:24], packet[24:40])
            self.tracer.emit("bypass", direction="out", inner_src=src, inner_dst=dst, length=len(packet))
        return packet

    process_outbound = process_inbound = _pass

    def status(self) -> dict:
        return {}


def adapter_loop(queue: int, direction: str, trace: str, trace_path: str | None) -> int:
    from bits.constants import Direction
    from bits.io.nfqueue import Processor, serve_with_signals
    from bits.io.tracefile import TraceWriter
    from bits.trace import Tracer

    writer = TraceWriter(trace_path) if trace_path and trace != "off" else None
    tracer = Tracer(writer.write if writer else None, trace)
    proc = Processor(PassThrough(tracer), [(queue, Direction(direction))], tracer, trace_writer=writer)
    serve_with_signals(proc)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("queue", type=int)
    p.add_argument("--adapter", choices=["out", "in"])
    p.add_argument("--batch", action="store_true", help="batch the verdicts (no adapter)")
    p.add_argument("--trace", choices=["off", "drops", "all"], default="off")
    p.add_argument("--trace-path")
    a = p.parse_args()
    if a.adapter:
        return adapter_loop(a.queue, a.adapter, a.trace, a.trace_path)
    if a.batch:
        return batched_accept_loop(a.queue)
    return accept_loop(a.queue)


if __name__ == "__main__":
    sys.exit(main())
