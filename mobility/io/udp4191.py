"""The IPv4 sockets of the DSMIPv6 tunnel (RFC 5555): UDP port 4191 and IPv6-in-IPv4.

Thin adapters around ``MnTunnel`` / ``HaTunnel`` (``mobility.tunnel``, decisions in
``mobility.udp4191``):

* ``UdpTunnelSocket`` -- a UDP socket. The HA binds it to its IPv4 address and port 4191; the MN
  binds ``0.0.0.0`` and one port for all its care-of addresses and names the source of each
  datagram with ``IP_PKTINFO`` (Req #3: the BU leaves from the new CoA while data still leaves from
  the old one). ``recvfrom`` gives the outer address and port -- on the HA exactly what Req #4
  records before IPsec. IPv4 fragmentation is allowed (``IP_PMTUDISC_DONT``): the packets inside
  are the engine's ESP, which nobody on the path could shorten.
* ``IpipSocket`` -- a raw IPv4 socket of protocol 41 (IPv6-in-IPv4, used for data when there is
  no NAT and no F flag). It reads whole IPv4 packets; sending, the kernel adds the header. The HA
  binds it to its IPv4 address, like its UDP socket, so that the MN sees the address it expects.
* ``RouteSender`` -- ``send(packet, route)`` for ``mobility.io.tun.pump``: an ``Ipv4Path`` goes
  to the socket it names, an IPv4 packet on ``Route.LOCAL`` (the HA re-sending what was forwarded
  to an IPv4 home address, for the engine's IPv4 OUTPUT hook) to an unmarked raw IPv4 socket
  (``RawIpv4Sender``), anything else to the IPv6 ``PacketSender``. Errors are counted by errno
  name, never raised into the loop.
* ``service_udp`` / ``service_ipip`` -- the loop steps: read, ``tunnel.inbound_udp`` /
  ``inbound_ipip``, write what comes back into the TUN (the engine sees it in raw PREROUTING,
  below the stack, as if it came from the wire).
* ``control_inbound_seq(path)`` -- api mode: the engine's anti-replay right edge of an inbound SA
  over its control socket, for ``HaTunnel(inbound_seq=...)``.

Nothing here decides anything; a core exception is logged and the packet dropped (fail closed).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import Any, Protocol, Self

from bits.errors import BitsError
from bits.io.control import control_request

from ..tunnel import EngineQueryError, Route, TunnelDrop
from ..udp4191 import DSMIPV6_PORT, Encap, InboundSeq, Ipv4Path
from .routes import SEND_MARK

LOG = logging.getLogger("mipbits.udp4191")

SO_MARK = getattr(socket, "SO_MARK", 36)
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DONT = getattr(socket, "IP_PMTUDISC_DONT", 0)
IPPROTO_IPV6_IN_IPV4 = 41
MAX_DATAGRAM = 65535
SERVICE_BATCH = 256  # datagrams per service call: the loop gets to its other sockets in between
RECV_BUFFER = 1 << 20
_IN_PKTINFO = struct.Struct("=I4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr


def _pktinfo(src: str | None) -> list[tuple[int, int, bytes]]:
    """Ancillary data choosing the IPv4 source address of one datagram (Linux ``IP_PKTINFO``)."""
    if src is None:
        return []
    return [(socket.IPPROTO_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, socket.inet_aton(src), bytes(4)))]


class _Ipv4Socket:
    sock: socket.socket

    def _setup(self, mark: int) -> None:
        self.sock.setblocking(False)
        if mark:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        self.sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UdpTunnelSocket(_Ipv4Socket):
    """UDP over IPv4 (non-blocking). HA: ``UdpTunnelSocket(ha_ipv4, 4191)``; MN:
    ``UdpTunnelSocket("0.0.0.0", port)`` (``port`` 0: the kernel picks one, see ``port``)."""

    def __init__(self, address: str = "0.0.0.0", port: int = DSMIPV6_PORT, *, mark: int = SEND_MARK) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self._setup(mark)
            self.sock.bind((address, port))
        except BaseException:
            self.sock.close()
            raise
        self.address, self.port = self.sock.getsockname()

    def recv(self) -> tuple[bytes, tuple[str, int]] | None:
        """One datagram and its source (address, port) -- the outer header, before IPsec."""
        try:
            data, addr = self.sock.recvfrom(MAX_DATAGRAM)
        except BlockingIOError:
            return None
        return data, (addr[0], addr[1])

    def send(self, payload: bytes, dst: str, port: int, src: str | None = None) -> None:
        self.sock.sendmsg([payload], _pktinfo(src), 0, (dst, port))


class IpipSocket(_Ipv4Socket):
    """Raw IPv4 socket of protocol 41 (IPv6-in-IPv4, RFC 4213 3.5), non-blocking. The HA binds it
    to its IPv4 address (``address``): its packets must come from the address the MN knows, not
    from whatever address the route to the MN would pick (the MN checks, ``MnTunnel.inbound_ipip``)."""

    def __init__(self, address: str | None = None, *, mark: int = SEND_MARK) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_IPV6_IN_IPV4)
        try:
            self._setup(mark)
            if address is not None:
                self.sock.bind((address, 0))
        except BaseException:
            self.sock.close()
            raise

    def recv(self) -> bytes | None:
        """One IPv4 packet, its header included."""
        try:
            return self.sock.recv(MAX_DATAGRAM)
        except BlockingIOError:
            return None

    def send(self, payload: bytes, dst: str, src: str | None = None) -> None:
        self.sock.sendmsg([payload], _pktinfo(src), 0, (dst, 0))


class RawIpv4Sender:
    """Whole IPv4 packets (header included) out of an unmarked raw socket: local packets the
    engine's IPv4 OUTPUT hook will see (``Route.LOCAL``)."""

    def __init__(self, mark: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        if mark:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)

    def send(self, packet: bytes) -> None:
        self.sock.sendto(packet, (socket.inet_ntop(socket.AF_INET, packet[16:20]), 0))

    def close(self) -> None:
        self.sock.close()


class RouteSender:
    """``send(packet, route)`` for ``tun.pump``: ``Ipv4Path`` -> UDP / protocol 41 (from its
    ``src`` when given); an IPv4 packet on ``Route.LOCAL`` -> ``local4``; another ``Route`` ->
    ``wire`` (the IPv6 ``PacketSender.send``). A path whose socket is missing or a failed send is
    counted, never raised."""

    def __init__(self, wire: Callable[[bytes, Route], None] | None, udp: UdpTunnelSocket | None,
                 ipip: IpipSocket | None = None, local4: RawIpv4Sender | None = None) -> None:
        self.wire = wire
        self.udp = udp
        self.ipip = ipip
        self.local4 = local4
        self.sent = {"udp": 0, "ipip": 0, "wire": 0, "local4": 0}
        self.errors: dict[str, int] = {}

    def send(self, packet: bytes, route: Route | Ipv4Path) -> None:
        if route.__class__ is not Ipv4Path:
            if packet[0] >> 4 == 4:
                self._local4(packet)
                return
            if self.wire is None:
                self._error("no-ipv6-sender")
                return
            self.wire(packet, route)  # type: ignore[arg-type]
            self.sent["wire"] += 1
            return
        path: Ipv4Path = route  # type: ignore[assignment]
        try:
            if path.encap is Encap.UDP:
                if self.udp is None:
                    self._error("no-udp-socket")
                    return
                self.udp.send(packet, path.dst, path.port, path.src)
                self.sent["udp"] += 1
            else:
                if self.ipip is None:
                    self._error("no-ipip-socket")
                    return
                self.ipip.send(packet, path.dst, path.src)
                self.sent["ipip"] += 1
        except OSError as exc:
            self._error(errno.errorcode.get(exc.errno or 0, str(exc.errno)))

    def _local4(self, packet: bytes) -> None:
        if self.local4 is None:
            self._error("no-ipv4-sender")
            return
        try:
            self.local4.send(packet)
        except OSError as exc:
            self._error(errno.errorcode.get(exc.errno or 0, str(exc.errno)))
            return
        self.sent["local4"] += 1

    def _error(self, name: str) -> None:
        self.errors[name] = self.errors.get(name, 0) + 1


# --- loop steps --------------------------------------------------------------------------------------------------


class UdpInbound(Protocol):
    def inbound_udp(self, payload: bytes, src: str, sport: int, now: float) -> bytes | TunnelDrop: ...


class IpipInbound(Protocol):
    def inbound_ipip(self, packet: bytes, now: float) -> bytes | TunnelDrop: ...


class Counters:
    """What the loop steps saw: ``tun`` (written into the TUN), ``dropped`` (the core refused),
    ``errors`` (a core exception or a failed TUN write)."""

    def __init__(self) -> None:
        self.counts = {"tun": 0, "dropped": 0, "errors": 0}


def service_udp(sock: UdpTunnelSocket, tunnel: UdpInbound, write: Callable[[bytes], None], now: float,
                counters: Counters | None = None, batch: int = SERVICE_BATCH) -> int:
    """Up to ``batch`` datagrams from ``sock`` through ``tunnel.inbound_udp`` into ``write``
    (``TunDevice.write``); returns how many were read."""
    n = 0
    while n < batch:
        got = sock.recv()
        if got is None:
            break
        n += 1
        payload, (src, sport) = got
        _deliver(lambda: tunnel.inbound_udp(payload, src, sport, now), write, counters)
    return n


def service_ipip(sock: IpipSocket, tunnel: IpipInbound, write: Callable[[bytes], None], now: float,
                 counters: Counters | None = None, batch: int = SERVICE_BATCH) -> int:
    """The same for IPv6-in-IPv4 packets."""
    n = 0
    while n < batch:
        packet = sock.recv()
        if packet is None:
            break
        n += 1
        _deliver(lambda: tunnel.inbound_ipip(packet, now), write, counters)
    return n


def _deliver(step: Callable[[], bytes | TunnelDrop], write: Callable[[bytes], None],
             counters: Counters | None) -> None:
    counts = counters.counts if counters is not None else None
    try:
        out = step()
    except Exception:  # a bug in the core: drop (fail closed), count, keep the loop alive
        LOG.exception("tunnel inbound (IPv4) raised")
        if counts is not None:
            counts["errors"] += 1
        return
    if isinstance(out, TunnelDrop):
        if counts is not None:
            counts["dropped"] += 1
        return
    try:
        write(out)
    except OSError:
        if counts is not None:
            counts["errors"] += 1
        return
    if counts is not None:
        counts["tun"] += 1


# --- api mode: which sequence number did the engine authenticate? ---------------------------------------------


def control_inbound_seq(path: str | os.PathLike[str], timeout: float = 0.5) -> InboundSeq:
    """``inbound_seq(spi)`` over the engine's control socket: the anti-replay right edge (``seq``
    of the inbound SA in ``status``), i.e. the highest sequence number it has authenticated.
    Asked once per Binding Update that came in UDP, never per packet. Failures raise
    ``EngineQueryError`` (``HaTunnel`` then takes the newest record)."""

    def inbound_seq(spi: int) -> int | None:
        try:
            status: Any = control_request(path, "status", timeout)
        except (BitsError, OSError, ValueError) as exc:
            raise EngineQueryError(f"status: {exc}") from None
        for sa in (status or {}).get("sas", ()):
            if sa.get("direction") == "in" and sa.get("spi") == spi:
                seq = sa.get("seq")
                return seq if isinstance(seq, int) else None
        return None

    return inbound_seq


__all__ = [
    "Counters",
    "IpipSocket",
    "RawIpv4Sender",
    "RouteSender",
    "UdpTunnelSocket",
    "control_inbound_seq",
    "service_ipip",
    "service_udp",
]
