"""Traffic for the testbed walk (no ping, nc or socat on this machine). Run inside a namespace:

    traffic.py ping DST [--interval S]          ICMPv6 echo every S seconds until SIGTERM/SIGINT
    traffic.py tcp-echo PORT                    echo every connection back; per connection, on
                                                EOF, one JSON line {"received", "sha256"}
    traffic.py tcp-stream DST PORT [--rate B/s] stream pseudo-random bytes to DST:PORT until
                                                SIGTERM/SIGINT, check the echo byte for byte

Each prints ``ready`` once it is set up and, when it ends, one JSON line with what it saw (wall
clock times, so that a caller can cut the run into windows):

* ping: ``{"probes": [[seq, sent_time, rtt_or_null], ...]}``
* tcp-stream: ``{"sent", "echoed", "intact", "sha256", "longest_stall"}`` -- ``intact`` means every
  echoed byte equals the byte sent at that offset and everything sent came back.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import time

ECHO_REQUEST, ECHO_REPLY = 128, 129
CHUNK = 4096
DRAIN_TIMEOUT = 20.0  # seconds to wait for the last echoes after the stream stops


class Stop:
    """SIGTERM / SIGINT end the run (a flag: the loops finish their step and report)."""

    def __init__(self) -> None:
        self.flag = False
        signal.signal(signal.SIGTERM, self.set)
        signal.signal(signal.SIGINT, self.set)

    def set(self, *_: object) -> None:
        self.flag = True


def say(obj: object) -> None:
    print(obj if isinstance(obj, str) else json.dumps(obj), flush=True)


# --- ping ----------------------------------------------------------------------------------------------


def ping(dst: str, interval: float) -> int:
    stop = Stop()
    sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    ident = os.getpid() & 0xFFFF
    sent: dict[int, float] = {}  # seq -> monotonic send time
    probes: list[list] = []  # [seq, wall send time, rtt]
    seq = 0
    next_send = time.monotonic()
    say("ready")
    while not stop.flag:
        now = time.monotonic()
        if now >= next_send:
            seq += 1
            body = struct.pack("!HHI", ident, seq & 0xFFFF, seq) + b"mipbits-walk"
            try:
                sock.sendto(struct.pack("!BBH", ECHO_REQUEST, 0, 0) + body, (dst, 0))
            except OSError:
                pass  # no route for a moment: counted as lost
            sent[seq] = now
            probes.append([seq, time.time(), None])
            next_send += interval
        if select.select([sock], [], [], max(0.0, next_send - time.monotonic()))[0]:
            _ping_reply(sock, ident, sent, probes)
    say({"probes": probes})
    return 0


def _ping_reply(sock: socket.socket, ident: int, sent: dict[int, float], probes: list[list]) -> None:
    data = sock.recv(2048)
    if len(data) < 12 or data[0] != ECHO_REPLY:
        return
    rid, _seq16, seq = struct.unpack("!HHI", data[4:12])
    if rid != ident or seq not in sent:
        return
    rtt = time.monotonic() - sent.pop(seq)
    probes[seq - 1][2] = round(rtt, 6)


# --- TCP -------------------------------------------------------------------------------------------------


def tcp_echo(port: int) -> int:
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("::", port))
    srv.listen(4)
    say("ready")
    while True:
        conn, _ = srv.accept()
        with conn:
            digest, received = hashlib.sha256(), 0
            while data := conn.recv(65536):
                digest.update(data)
                received += len(data)
                conn.sendall(data)
            say({"received": received, "sha256": digest.hexdigest()})


def tcp_stream(dst: str, port: int, rate: float, seed: int) -> int:
    stop = Stop()
    sock = socket.create_connection((dst, port), timeout=10)
    sock.setblocking(False)
    gen = random.Random(seed)
    sent_data = bytearray()  # what was sent and not yet echoed (compared, then dropped)
    digest = hashlib.sha256()
    sent = echoed = 0
    intact = True
    start = last_progress = time.monotonic()
    stall = 0.0
    pending = b""
    say("ready")
    while not stop.flag:
        now = time.monotonic()
        if not pending and sent < (now - start) * rate:
            pending = gen.randbytes(CHUNK)
        want_write = [sock] if pending else []
        readable, writable, _ = select.select([sock], want_write, [], 0.01)
        if writable:
            n = _send_some(sock, pending)
            digest.update(pending[:n])
            sent_data += pending[:n]
            pending, sent = pending[n:], sent + n
        if readable:
            got = _recv_some(sock)
            if got is None:
                break
            intact = intact and sent_data[: len(got)] == got
            del sent_data[: len(got)]
            echoed += len(got)
            if got:
                stall, last_progress = max(stall, now - last_progress), now
    sock.setblocking(True)
    if pending:
        sock.sendall(pending)
        digest.update(pending)
        sent_data += pending
        sent += len(pending)
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(DRAIN_TIMEOUT)
    try:
        while got := sock.recv(65536):
            intact = intact and sent_data[: len(got)] == got
            del sent_data[: len(got)]
            echoed += len(got)
    except OSError as exc:
        print(f"tcp-stream: {exc}", file=sys.stderr)
    say({"sent": sent, "echoed": echoed, "intact": intact and echoed == sent, "sha256": digest.hexdigest(),
         "longest_stall": round(stall, 3)})
    return 0


def _send_some(sock: socket.socket, data: bytes) -> int:
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0


def _recv_some(sock: socket.socket) -> bytes | None:
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return b""
    return data or None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="traffic.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("ping")
    s.add_argument("dst")
    s.add_argument("--interval", type=float, default=0.05)
    s = sub.add_parser("tcp-echo")
    s.add_argument("port", type=int)
    s = sub.add_parser("tcp-stream")
    s.add_argument("dst")
    s.add_argument("port", type=int)
    s.add_argument("--rate", type=float, default=200_000, help="bytes per second")
    s.add_argument("--seed", type=int, default=4)
    a = p.parse_args(argv)
    if a.cmd == "ping":
        return ping(a.dst, a.interval)
    if a.cmd == "tcp-echo":
        return tcp_echo(a.port)
    return tcp_stream(a.dst, a.port, a.rate, a.seed)


if __name__ == "__main__":
    sys.exit(main())
