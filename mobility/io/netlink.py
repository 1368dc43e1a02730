"""Movement detection from rtnetlink (RFC 6275 11.5.1 says how, not with what: we use the kernel's
address and link notifications).

Three parts:

* ``parse_messages(data, ipv4=False)``: rtnetlink messages (RTM_NEWLINK/DELLINK,
  RTM_NEWADDR/DELADDR) -> ``LinkEvent`` / ``AddressEvent``, with ``struct`` only. IPv4 addresses
  only when asked for (DSMIPv6). Pure; malformed input raises ``NetlinkParseError``.
* ``NetState`` + ``locate(state, interfaces, home_prefix)``: pure. The current links and
  addresses, and from them where the MN is: at home (an up configured interface holds an address
  of the home prefix), away with a care-of address -- an IPv6 one, or on an IPv4-only link an
  IPv4 one (RFC 5555 4.4.1: DSMIPv6), a dual-stack link also naming its IPv4 address -- or detached.
* ``NetlinkMonitor``: the socket, subscribed to RTMGRP_LINK and RTMGRP_IPV6_IFADDR (and
  RTMGRP_IPV4_IFADDR for DSMIPv6), plus the initial dump. The composition root watches
  ``fileno()`` and calls ``read()`` when it is readable.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import ParseError

# --- Specification (linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h, linux/if.h) ------------------

NETLINK_ROUTE = 0
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE = 1, 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ROOT, NLM_F_MATCH = 0x1, 0x2, 0x100, 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
IFLA_IFNAME = 3
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFF_UP, IFF_RUNNING, IFF_LOWER_UP = 0x1, 0x40, 0x10000
IFA_F_TEMPORARY, IFA_F_DADFAILED, IFA_F_DEPRECATED, IFA_F_TENTATIVE = 0x01, 0x08, 0x20, 0x40
RT_SCOPE_UNIVERSE = 0

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, pid (host byte order)
IFINFOMSG = struct.Struct("=BxHiII")  # family, pad, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
RTATTR = struct.Struct("=HH")  # length, type
_U32 = struct.Struct("=I")

# --- Implementation ------------------------------------------------------------------------------------------

RECV_BUFFER = 1 << 16
_UNUSABLE = IFA_F_TENTATIVE | IFA_F_DADFAILED


class NetlinkParseError(ParseError):
    """A truncated or malformed rtnetlink message."""


class NetlinkError(OSError):
    """The kernel answered a request with an error (NLMSG_ERROR)."""


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """A link appeared, changed (up/down, carrier) or was removed."""

    index: int
    name: str | None
    up: bool  # administratively up (IFF_UP) and with carrier (IFF_RUNNING / IFF_LOWER_UP)
    removed: bool = False


IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class AddressEvent:
    """An address (IPv6; IPv4 when asked for) was added/changed (``removed`` False) or removed on
    interface ``index``."""

    index: int
    address: IpAddress
    prefixlen: int
    flags: int
    scope: int
    removed: bool = False


NetEvent = LinkEvent | AddressEvent


def _align(n: int) -> int:
    return (n + 3) & ~3


def parse_attributes(data: bytes, off: int, end: int) -> dict[int, bytes]:
    """rtattr TLVs in ``data[off:end]`` -> {type: payload} (the last of a repeated type wins)."""
    attrs: dict[int, bytes] = {}
    while off + RTATTR.size <= end:
        length, rtype = RTATTR.unpack_from(data, off)
        if length < RTATTR.size or off + length > end:
            raise NetlinkParseError(f"rtattr length {length} at {off}")
        attrs[rtype & 0x3FFF] = data[off + RTATTR.size : off + length]  # without NLA_F_* bits
        off += _align(length)
    return attrs


def parse_messages(data: bytes, *, ipv4: bool = False) -> list[NetEvent]:
    """Link and IPv6 (with ``ipv4``: also IPv4) address events in a buffer of netlink messages;
    DONE/NOOP/other types are skipped; an NLMSG_ERROR with a non-zero error raises ``NetlinkError``."""
    events: list[NetEvent] = []
    off = 0
    while off + NLMSGHDR.size <= len(data):
        length, mtype, _flags, _seq, _pid = NLMSGHDR.unpack_from(data, off)
        if length < NLMSGHDR.size or off + length > len(data):
            raise NetlinkParseError(f"netlink message length {length} at {off}")
        body, end = off + NLMSGHDR.size, off + length
        if mtype == NLMSG_ERROR:
            _raise_error(data, body, end)
        elif mtype in (RTM_NEWLINK, RTM_DELLINK):
            events.append(_link(data, body, end, mtype == RTM_DELLINK))
        elif mtype in (RTM_NEWADDR, RTM_DELADDR):
            event = _address(data, body, end, mtype == RTM_DELADDR, ipv4)
            if event is not None:
                events.append(event)
        off += _align(length)
    return events


def _raise_error(data: bytes, body: int, end: int) -> None:
    if body + 4 > end:
        raise NetlinkParseError("truncated NLMSG_ERROR")
    (err,) = struct.unpack_from("=i", data, body)
    if err:
        raise NetlinkError(-err, os.strerror(-err))


def _link(data: bytes, body: int, end: int, removed: bool) -> LinkEvent:
    if body + IFINFOMSG.size > end:
        raise NetlinkParseError("truncated ifinfomsg")
    _family, _type, index, flags, _change = IFINFOMSG.unpack_from(data, body)
    attrs = parse_attributes(data, body + IFINFOMSG.size, end)
    raw = attrs.get(IFLA_IFNAME)
    name = raw.split(b"\x00", 1)[0].decode("ascii", "replace") if raw is not None else None
    up = bool(flags & IFF_UP) and bool(flags & (IFF_RUNNING | IFF_LOWER_UP))
    return LinkEvent(index, name, up and not removed, removed)


def _address(data: bytes, body: int, end: int, removed: bool, ipv4: bool = False) -> AddressEvent | None:
    if body + IFADDRMSG.size > end:
        raise NetlinkParseError("truncated ifaddrmsg")
    family, prefixlen, flags, scope, index = IFADDRMSG.unpack_from(data, body)
    if family != socket.AF_INET6 and not (ipv4 and family == socket.AF_INET):
        return None
    attrs = parse_attributes(data, body + IFADDRMSG.size, end)
    if family == socket.AF_INET:  # IFA_LOCAL is the local address (IFA_ADDRESS: a point-to-point peer)
        raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
        if raw is None or len(raw) != 4:
            raise NetlinkParseError("IPv4 address message without a 4-octet IFA_LOCAL")
        address: IpAddress = ipaddress.IPv4Address(raw)
    else:
        raw = attrs.get(IFA_ADDRESS) or attrs.get(IFA_LOCAL)
        if raw is None or len(raw) != 16:
            raise NetlinkParseError("IPv6 address message without a 16-octet IFA_ADDRESS")
        address = ipaddress.IPv6Address(raw)
    if IFA_FLAGS in attrs and len(attrs[IFA_FLAGS]) == 4:
        flags = _U32.unpack(attrs[IFA_FLAGS])[0]  # the 32-bit flags supersede the 8-bit field
    return AddressEvent(index, address, prefixlen, flags, scope, removed)


def push_dump_request(msg_type: int, seq: int, family: int = socket.AF_UNSPEC) -> bytes:
    """An RTM_GETLINK / RTM_GETADDR dump request."""
    if msg_type == RTM_GETLINK:
        body = IFINFOMSG.pack(family, 0, 0, 0, 0)
    else:
        body = IFADDRMSG.pack(family, 0, 0, 0, 0)
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


# --- state and location (pure) --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Address:
    address: IpAddress
    prefixlen: int
    flags: int
    scope: int

    @property
    def usable(self) -> bool:
        """Global scope (ULA, documentation and private IPv4 prefixes included: testbeds and
        NATs use them), not tentative, not DAD-failed: fit to be a care-of address."""
        a = self.address
        return (self.scope == RT_SCOPE_UNIVERSE and not self.flags & _UNUSABLE
                and not (a.is_link_local or a.is_loopback or a.is_multicast or a.is_unspecified))


@dataclass
class NetState:
    """Links by index and their IPv6 addresses, kept up to date from events."""

    names: dict[int, str] = field(default_factory=dict)
    up: dict[int, bool] = field(default_factory=dict)
    addresses: dict[int, dict[IpAddress, Address]] = field(default_factory=dict)

    def apply(self, events: Iterable[NetEvent]) -> None:
        for ev in events:
            if isinstance(ev, LinkEvent):
                self._link(ev)
            else:
                self._address(ev)

    def _link(self, ev: LinkEvent) -> None:
        if ev.removed:
            self.names.pop(ev.index, None)
            self.up.pop(ev.index, None)
            self.addresses.pop(ev.index, None)
            return
        if ev.name is not None:
            self.names[ev.index] = ev.name
        self.up[ev.index] = ev.up

    def _address(self, ev: AddressEvent) -> None:
        addrs = self.addresses.setdefault(ev.index, {})
        if ev.removed:
            addrs.pop(ev.address, None)
        else:
            addrs[ev.address] = Address(ev.address, ev.prefixlen, ev.flags, ev.scope)

    def index(self, name: str) -> int | None:
        return next((i for i, n in self.names.items() if n == name), None)


@dataclass(frozen=True, slots=True)
class Location:
    """Where the MN is: ``home`` (on ``interface``), ``away`` (``coa`` on ``interface``) or
    ``detached`` (no configured interface is up with a usable address). ``coa`` is IPv4 on an
    IPv4-only link (DSMIPv6); on a dual-stack link it is the IPv6 one and ``ipv4_coa`` the other
    (RFC 5555 4.4.1: the IPv6 one is tried first)."""

    kind: str
    interface: str | None = None
    coa: IpAddress | None = None
    ipv4_coa: ipaddress.IPv4Address | None = None

    @property
    def at_home(self) -> bool:
        return self.kind == "home"


DETACHED = Location("detached")


def locate(state: NetState, interfaces: Sequence[str], home_prefix: ipaddress.IPv6Network | str) -> Location:
    """RFC 6275 11.5: the first configured interface (in preference order) that is up and has a
    usable global address decides. An address of the home prefix there: at home. Otherwise the
    care-of address is its best IPv6 address (not deprecated, not temporary, then the lowest); a
    link with IPv4 addresses only (the state holds IPv4 addresses only when the monitor asked for
    them) gives its best IPv4 address (RFC 5555 4.4.1), a dual-stack link names both."""
    prefix = ipaddress.IPv6Network(home_prefix)
    for name in interfaces:
        index = state.index(name)
        if index is None or not state.up.get(index):
            continue
        usable = [a for a in state.addresses.get(index, {}).values() if a.usable]
        v6 = [a for a in usable if a.address.version == 6]
        v4 = [a for a in usable if a.address.version == 4]
        if any(a.address in prefix for a in v6):
            return Location("home", name)
        best4 = min(v4, key=_preference).address if v4 else None
        if v6:
            return Location("away", name, min(v6, key=_preference).address, best4)  # type: ignore[arg-type]
        if best4 is not None:
            return Location("away", name, best4)
    return DETACHED


def _preference(a: Address) -> tuple[bool, bool, int]:
    return bool(a.flags & IFA_F_DEPRECATED), bool(a.flags & IFA_F_TEMPORARY), int(a.address)


# --- the socket ---------------------------------------------------------------------------------------------------------


class NetlinkMonitor:
    """An rtnetlink socket subscribed to link and IPv6 address changes (non-blocking); with
    RTMGRP_IPV4_IFADDR in ``groups`` IPv4 address events are reported too."""

    def __init__(self, groups: int = RTMGRP_LINK | RTMGRP_IPV6_IFADDR) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        self.sock.bind((0, groups))
        self.sock.setblocking(False)
        self.ipv4 = bool(groups & RTMGRP_IPV4_IFADDR)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[NetEvent]:
        """Every event queued now (an overrun, ENOBUFS, means events were lost: dump again)."""
        events: list[NetEvent] = []
        while True:
            try:
                data = self.sock.recv(RECV_BUFFER)
            except BlockingIOError:
                return events
            events.extend(parse_messages(data, ipv4=self.ipv4))

    def close(self) -> None:
        self.sock.close()


def dump(timeout: float = 5.0, *, ipv4: bool = False) -> list[NetEvent]:
    """The current links, then the current IPv6 (and with ``ipv4`` IPv4) addresses, as events (on
    a socket of its own, so the dump does not interleave with notifications)."""
    events: list[NetEvent] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE) as sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        requests = [(RTM_GETLINK, socket.AF_UNSPEC), (RTM_GETADDR, socket.AF_INET6)]
        if ipv4:
            requests.append((RTM_GETADDR, socket.AF_INET))
        for seq, (mtype, family) in enumerate(requests, 1):
            sock.send(push_dump_request(mtype, seq, family))
            events.extend(_read_dump(sock, seq, ipv4))
    return events


def _read_dump(sock: socket.socket, seq: int, ipv4: bool = False) -> list[NetEvent]:
    events: list[NetEvent] = []
    while True:
        data = sock.recv(RECV_BUFFER)
        events.extend(parse_messages(data, ipv4=ipv4))
        if _done(data, seq):
            return events


def _done(data: bytes, seq: int) -> bool:
    off = 0
    while off + NLMSGHDR.size <= len(data):
        length, mtype, _flags, mseq, _pid = NLMSGHDR.unpack_from(data, off)
        if mtype == NLMSG_DONE and mseq == seq:
            return True
        if length < NLMSGHDR.size:
            return True
        off += _align(length)
    return False


__all__ = [
    "DETACHED",
    "RTMGRP_IPV4_IFADDR",
    "AddressEvent",
    "LinkEvent",
    "Location",
    "NetState",
    "NetlinkError",
    "NetlinkMonitor",
    "NetlinkParseError",
    "dump",
    "locate",
    "parse_attributes",
    "parse_messages",
    "push_dump_request",
]
