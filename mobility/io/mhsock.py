"""Sockets of the mobility module and the tunnel module.

``MhSocket``: a raw IPv6 socket for the Mobility Header (protocol 135) bound to one address (the
MN's HoA, the HA's address). We compute the MH checksum ourselves (``push_mh``, with the
pseudo-header of the packet as it leaves the engine: HoA -> HA for a BU, HA -> HoA for a BA -- the
addresses RFC 6275 6.1.1 names once the Home Address option / type 2 routing header are in) and
verify it on receive, so the kernel's own MH checksumming (offset 4) is switched off.

``PacketSender``: whole IPv6 packets from the tunnel module out of a raw socket
(``socket(AF_INET6, SOCK_RAW, IPPROTO_RAW)``, header included). ``Route.WIRE`` goes through the
socket with ``SO_MARK = SEND_MARK``: the engine's rules skip it (it is already ESP) and, on the MN,
the policy rule sends it out of the visited link instead of back into the TUN. ``Route.LOCAL``
goes through an unmarked socket: a local packet the engine's OUTPUT hook will protect.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import sys
from dataclasses import dataclass

from ..errors import ParseError
from ..mh import MobilityMessage, UnknownMessage, pull_mh, push_mh, verify_checksum
from ..tunnel import Route
from .routes import SEND_MARK

IPPROTO_MH = 135
SO_MARK = getattr(socket, "SO_MARK", 36)
IPV6_CHECKSUM = getattr(socket, "IPV6_CHECKSUM", 7)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
MAX_MH = 65535
_PKTINFO_SPACE = socket.CMSG_SPACE(20)  # struct in6_pktinfo: address, interface index


@dataclass(frozen=True, slots=True)
class ReceivedMh:
    """A Mobility Header message and the addresses it arrived with (after the tunnel module's
    rewrites: the HoA as source at the HA, the HoA as destination at the MN)."""

    src: ipaddress.IPv6Address
    dst: ipaddress.IPv6Address
    ifindex: int
    message: MobilityMessage | UnknownMessage


class MhSocket:
    """Send and receive Mobility Header messages (non-blocking)."""

    def __init__(self, address: str | ipaddress.IPv6Address | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, IPPROTO_MH)
        try:
            self.sock.setsockopt(socket.IPPROTO_IPV6, IPV6_CHECKSUM, -1)
            self.sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            if address is not None:
                self.sock.bind((str(address), 0))
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise
        self.address = None if address is None else ipaddress.IPv6Address(address)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, msg: MobilityMessage | UnknownMessage, dst: str | ipaddress.IPv6Address,
             src: str | ipaddress.IPv6Address | None = None) -> None:
        """Send ``msg`` to ``dst`` from ``src`` (default: the bound address)."""
        source = ipaddress.IPv6Address(src if src is not None else self.address)
        target = ipaddress.IPv6Address(dst)
        self.sock.sendto(push_mh(msg, source.packed, target.packed), (str(target), 0))

    def recv(self) -> ReceivedMh | None:
        """One message, or None when nothing is waiting. A bad checksum or a malformed MH raises
        ``ParseError`` (RFC 6275 9.2: the caller discards it, counted)."""
        try:
            data, ancillary, _flags, addr = self.sock.recvmsg(MAX_MH, _PKTINFO_SPACE)
        except BlockingIOError:
            return None
        src = ipaddress.IPv6Address(addr[0].split("%", 1)[0])
        dst, ifindex = _pktinfo(ancillary)
        if dst is None:
            raise ParseError("no IPV6_PKTINFO: destination address unknown")
        if not verify_checksum(data, src.packed, dst.packed):
            raise ParseError("Mobility Header checksum mismatch")
        return ReceivedMh(src, dst, ifindex, pull_mh(data))

    def close(self) -> None:
        self.sock.close()


def _pktinfo(ancillary: list[tuple[int, int, bytes]]) -> tuple[ipaddress.IPv6Address | None, int]:
    for level, ctype, data in ancillary:
        if level == socket.IPPROTO_IPV6 and ctype == IPV6_PKTINFO and len(data) >= 20:
            return ipaddress.IPv6Address(data[:16]), int.from_bytes(data[16:20], sys.byteorder)
    return None, 0


class RawSender:
    """Whole IPv6 packets out of an IPPROTO_RAW socket (the header is ours), optionally marked."""

    def __init__(self, mark: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        if mark:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        self.mark = mark

    def send(self, packet: bytes) -> None:
        self.sock.sendto(packet, (socket.inet_ntop(socket.AF_INET6, packet[24:40]), 0))

    def close(self) -> None:
        self.sock.close()


class PacketSender:
    """``send(packet, route)`` for ``tun.pump``: WIRE marked, LOCAL unmarked. A failed send
    (no route, message too long) is counted by errno name, never raised into the loop."""

    def __init__(self, mark: int = SEND_MARK) -> None:
        self.wire = RawSender(mark)
        self.local = RawSender(0)
        self.sent = {Route.WIRE: 0, Route.LOCAL: 0}
        self.errors: dict[str, int] = {}

    def send(self, packet: bytes, route: Route) -> None:
        sender = self.local if route is Route.LOCAL else self.wire
        try:
            sender.send(packet)
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            self.errors[name] = self.errors.get(name, 0) + 1
            return
        self.sent[route] += 1

    def close(self) -> None:
        self.wire.close()
        self.local.close()


__all__ = ["MhSocket", "PacketSender", "RawSender", "ReceivedMh"]
