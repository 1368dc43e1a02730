"""The TUN device of the (DS)MIPv6 tunnel interface, and the loop step that drains it.

``TunDevice`` opens ``/dev/net/tun`` as a layer-3 device without packet information
(IFF_TUN | IFF_NO_PI: each read is one IP packet), switches off IPv6 address generation on it (no
link-local address, so no Router Solicitations or MLD reports wander into the tunnel), sets the MTU
and brings it up via ``ip``. It is deleted when the file descriptor is closed.

``pump(tun, tunnel, send, now)`` reads what the kernel routed into the device and hands each
packet to the tunnel module (``MnTunnel`` / ``HaTunnel``), then writes the results where their
``Route`` says: the wire or the engine (``send``), or back into the TUN.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Callable
from typing import Protocol, Self

from ..tunnel import Route
from .routes import Runner, command_runner

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, flags (40 octets)
DEFAULT_NAME = "mip6tnl"
MAX_PACKET = 65535
PUMP_BATCH = 256  # packets per pump() call: the loop gets to its other sockets in between


class TunDevice:
    """A layer-3 TUN device (non-blocking)."""

    def __init__(self, name: str = DEFAULT_NAME, *, mtu: int, runner: Runner | None = None) -> None:
        self.fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ifr = fcntl.ioctl(self.fd, TUNSETIFF, _IFREQ.pack(name.encode(), IFF_TUN | IFF_NO_PI))
            self.name = ifr[:16].rstrip(b"\x00").decode()
            run = runner or command_runner()
            run(["ip", "link", "set", "dev", self.name, "addrgenmode", "none"])
            run(["ip", "link", "set", "dev", self.name, "mtu", str(mtu), "up"])
        except BaseException:
            os.close(self.fd)
            raise
        self.mtu = mtu

    def fileno(self) -> int:
        return self.fd

    def read(self) -> bytes | None:
        """One packet, or None when none is waiting."""
        try:
            return os.read(self.fd, MAX_PACKET)
        except BlockingIOError:
            return None

    def write(self, packet: bytes) -> None:
        """Hand ``packet`` to the local stack as if it arrived on this device."""
        os.write(self.fd, packet)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TunnelModule(Protocol):
    def outbound(self, packet: bytes, now: float) -> list[tuple[bytes, Route]]: ...


class Device(Protocol):
    def read(self) -> bytes | None: ...

    def write(self, packet: bytes) -> None: ...


def pump(tun: Device, tunnel: TunnelModule, send: Callable[[bytes, Route], None], now: float,
         batch: int = PUMP_BATCH) -> int:
    """Move up to ``batch`` packets from the TUN through ``tunnel.outbound``; returns how many."""
    n = 0
    while n < batch:
        packet = tun.read()
        if packet is None:
            break
        n += 1
        for out, route in tunnel.outbound(packet, now):
            if route is Route.TUN:
                try:
                    tun.write(out)
                except OSError:  # the device went away: the loop notices on its next read
                    pass
            else:
                send(out, route)
    return n


__all__ = ["DEFAULT_NAME", "TunDevice", "pump"]
