"""Tiny traffic tools run inside namespaces (this machine has no ping, nc or socat).

    nstool.py ping DST [--count N] [--timeout S]           exit 0 when an echo reply came back
    nstool.py udp-send DST PORT TEXT [--count N] [--sport P]
    nstool.py udp-listen PORT [--duration S] [--count N]   prints "SRC TEXT" per datagram
    nstool.py tcp-echo PORT                                serves until killed
    nstool.py tcp-check DST PORT [--bytes N] [--timeout S]          exit 0 when N bytes echo back intact
    nstool.py sniff DEV --src ADDR... [--duration S]       after "ready", counts IP packets from
                                                           ADDR on DEV (ND excluded), prints it

Addresses may be IPv4 or IPv6; listeners bind the wildcard of both families.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import select
import socket
import struct
import sys
import time


def _family(addr: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def ping(dst: str, count: int, timeout: float) -> int:
    fam = _family(dst)
    v6 = fam == socket.AF_INET6
    sock = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    req_type, rep_type = (128, 129) if v6 else (8, 0)
    for seq in range(1, count + 1):
        body = struct.pack("!HH", ident, seq) + b"mipbits-ping"
        csum = 0 if v6 else _checksum(struct.pack("!BBH", req_type, 0, 0) + body)  # kernel does v6
        sock.sendto(struct.pack("!BBH", req_type, 0, csum) + body, (dst, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                break
            data = sock.recv(2048)
            icmp = data if v6 else data[(data[0] & 0x0F) * 4:]
            if len(icmp) >= 8 and icmp[0] == rep_type and struct.unpack("!HH", icmp[4:8]) == (ident, seq):
                return 0
    return 1


def udp_send(dst: str, port: int, text: str, count: int, sport: int | None) -> int:
    sock = socket.socket(_family(dst), socket.SOCK_DGRAM)
    if sport:
        sock.bind(("::" if _family(dst) == socket.AF_INET6 else "0.0.0.0", sport))
    for _ in range(count):
        sock.sendto(text.encode(), (dst, port))
    return 0


def _dual_stack(kind: int, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    return sock


def udp_listen(port: int, duration: float, count: int) -> int:
    sock = _dual_stack(socket.SOCK_DGRAM, port)
    print("ready", flush=True)
    deadline = time.monotonic() + duration
    got = 0
    while got < count and (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        data, addr = sock.recvfrom(65535)
        src = addr[0].removeprefix("::ffff:")
        print(f"{src} {data.decode(errors='replace')}", flush=True)
        got += 1
    return 0


def tcp_echo(port: int) -> int:
    srv = _dual_stack(socket.SOCK_STREAM, port)
    srv.listen(8)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)


def tcp_check(dst: str, port: int, nbytes: int, timeout: float = 10.0) -> int:
    payload = os.urandom(nbytes)
    with socket.create_connection((dst, port), timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    return 0 if got == payload else 1


def _ip_src_and_nd(frame: bytes) -> tuple[str | None, bool]:
    ethertype = int.from_bytes(frame[12:14], "big")
    ip = frame[14:]
    if ethertype == 0x0800 and len(ip) >= 20:
        return socket.inet_ntop(socket.AF_INET, ip[12:16]), False
    if ethertype == 0x86DD and len(ip) >= 40:
        nd = ip[6] == 58 and len(ip) > 40 and 133 <= ip[40] <= 137
        return socket.inet_ntop(socket.AF_INET6, ip[8:24]), nd
    return None, False


def sniff(dev: str, sources: list[str], duration: float) -> int:
    """Count what leaves a host on the wire: IP packets from ``sources`` (ND does not count)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sock.bind((dev, 0))
    wanted = {str(ipaddress.ip_address(a)) for a in sources}
    print("ready", flush=True)
    seen = 0
    deadline = time.monotonic() + duration
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        frame = sock.recv(65535)
        src, nd = _ip_src_and_nd(frame)
        if src in wanted and not nd:
            seen += 1
    print(seen, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nstool")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("ping")
    s.add_argument("dst")
    s.add_argument("--count", type=int, default=1)
    s.add_argument("--timeout", type=float, default=2.0)
    s = sub.add_parser("udp-send")
    s.add_argument("dst")
    s.add_argument("port", type=int)
    s.add_argument("text")
    s.add_argument("--count", type=int, default=1)
    s.add_argument("--sport", type=int)
    s = sub.add_parser("udp-listen")
    s.add_argument("port", type=int)
    s.add_argument("--duration", type=float, default=5.0)
    s.add_argument("--count", type=int, default=1 << 30)
    s = sub.add_parser("tcp-echo")
    s.add_argument("port", type=int)
    s = sub.add_parser("tcp-check")
    s.add_argument("dst")
    s.add_argument("port", type=int)
    s.add_argument("--bytes", type=int, default=100_000)
    s.add_argument("--timeout", type=float, default=10.0)
    s = sub.add_parser("sniff")
    s.add_argument("dev")
    s.add_argument("--src", nargs="+", required=True)
    s.add_argument("--duration", type=float, default=2.0)
    a = p.parse_args(argv)
    if a.cmd == "sniff":
        return sniff(a.dev, a.src, a.duration)
    if a.cmd == "ping":
        return ping(a.dst, a.count, a.timeout)
    if a.cmd == "udp-send":
        return udp_send(a.dst, a.port, a.text, a.count, a.sport)
    if a.cmd == "udp-listen":
        return udp_listen(a.port, a.duration, a.count)
    if a.cmd == "tcp-echo":
        return tcp_echo(a.port)
    try:
        return tcp_check(a.dst, a.port, a.bytes, a.timeout)
    except OSError as exc:
        print(f"tcp-check: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
