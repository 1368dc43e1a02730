"""DSMIPv6 (RFC 5555) over IPv4: UDP port 4191, IPv6-in-IPv4, and the outer-address records of
draft section 4.4 (Req #4). Sans-I/O: no socket, no clock (``now`` is a parameter).

The tunnel module (``mobility.tunnel``) never rewrites a packet for an IPv4 care-of address: the
IPv6 packet the engine produced (outer header HoA <-> HA, ESP) travels *unchanged* inside IPv4,
either after a UDP header (port 4191) or directly (protocol 41). What this module supplies:

* ``Ipv4Path`` -- the "route" ``MnTunnel``/``HaTunnel.outbound`` return next to such a packet: the
  encapsulation (``Encap.UDP`` / ``Encap.IPIP``), the IPv4 destination, the UDP destination port
  and, on the MN, the IPv4 source (the care-of address the packet must leave from: Req #3 needs
  two at once). The adapter (``mobility.io.udp4191``) owns the sockets that add the headers.
* ``OuterRecords`` -- the HA's records of the outer IPv4 source address and UDP source port
  (V4ADDR, Z; RFC 5555 4.2) of packets that may carry a Binding Update, made *before* IPsec, and
  the choice, *after* IPsec, of the record that belongs to the authenticated BU (draft 4.4.2).
* ``pull_ipv4_outer`` / ``push_udp4`` / ``push_ipip`` -- the IPv4 (and UDP) headers for the raw
  protocol-41 socket, tests and captures.

Packet formats (RFC 5555 4.1, 4.2; docs/dsmipv6.md):

==========================  ==============================================================
BU, MN -> HA                IPv4(CoA -> HA4) UDP(Z -> 4191) IPv6(HoA -> HA) ESP(transport) MH
BA, HA -> MN                IPv4(HA4 -> V4ADDR) UDP(4191 -> Z) IPv6(HA -> HoA) ESP MH
data, NAT or F              IPv4 UDP(4191) IPv6(HoA <-> HA) ESP(tunnel) inner IPv6 / IPv4
data, no NAT and no F       IPv4(CoA <-> HA4, protocol 41) IPv6(HoA <-> HA) ESP(tunnel) inner
==========================  ==============================================================

No Home Address option and no type 2 routing header: the IPv6 header inside UDP already carries
the home address (RFC 5555 4.2 shows ``IPv6 header (src=V6HOA, dst=HAADDR)`` and the BA with
``dst=V6HOA``), and the care-of address is the ESP-protected IPv4 Care-of Address option.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import deque
from collections.abc import Callable
from enum import IntEnum
from typing import NamedTuple

from bits.ip import push_ipv4_header

from .binding import Ipv4Endpoint
from .constants import DSMIPV6_UDP_PORT
from .errors import ParseError

# --- Specification ----------------------------------------------------------------------------------

DSMIPV6_PORT = DSMIPV6_UDP_PORT  # 4191 (RFC 5555 section 8)
IPV4_HEADER_LEN = 20
UDP_HEADER_LEN = 8
UDP4_OVERHEAD = IPV4_HEADER_LEN + UDP_HEADER_LEN  # 28: IPv4 + UDP around the IPv6 packet
IPIP_OVERHEAD = IPV4_HEADER_LEN  # 20: IPv6 in IPv4 (RFC 4213 3.5)
IPPROTO_IPV6_IN_IPV4 = 41
IPPROTO_UDP = 17

# --- Implementation ---------------------------------------------------------------------------------

#: Octets the TUN device must leave for what the tunnel module adds after the engine: 24 for a
#: Home Address option / type 2 routing header over IPv6, 28 for IPv4 + UDP. Use it for
#: ``tunnel_mtus(path_mtu, shape, reserve=DSMIPV6_RESERVE)`` when IPv4 care-of addresses may occur.
DSMIPV6_RESERVE = max(24, UDP4_OVERHEAD)
PENDING_LIFETIME = 5.0  # seconds a recorded outer endpoint waits for its authenticated BU
MAX_CANDIDATES = 8  # records kept per home address (the newest win)
MAX_RECORDED_HOAS = 4096  # home addresses with records; the oldest is forgotten beyond this

_V4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_SEQ = struct.Struct("!I")


class Encap(IntEnum):
    """How an IPv6 packet travels to or from an IPv4 care-of address (RFC 5555 4.1)."""

    UDP = IPPROTO_UDP  # IPv4 | UDP (4191) | IPv6: BUs and BAs always; data with a NAT or F = 1
    IPIP = IPPROTO_IPV6_IN_IPV4  # IPv4 (protocol 41) | IPv6: data without NAT and without F


class Ipv4Path(NamedTuple):
    """The IPv4 "route" of a packet returned by the tunnel module: send the IPv6 packet inside
    ``encap`` to ``dst`` (UDP destination ``port``; 0 for IPIP), from ``src`` (the MN's IPv4
    care-of address; None: the socket's own address, as on the HA, whose UDP socket is bound to
    its IPv4 address and port 4191). Addresses are dotted strings, ready for the socket calls."""

    encap: Encap
    dst: str
    port: int = 0
    src: str | None = None

    def text(self) -> str:
        """``udp 203.0.113.2:40001`` / ``ipip 198.51.100.100`` (trace records)."""
        if self.encap is Encap.UDP:
            return f"udp {self.dst}:{self.port}"
        return f"ipip {self.dst}"


def udp_path(dst: str | ipaddress.IPv4Address, port: int = DSMIPV6_PORT, src: str | None = None) -> Ipv4Path:
    return Ipv4Path(Encap.UDP, str(ipaddress.IPv4Address(dst)), port, src)


def ipip_path(dst: str | ipaddress.IPv4Address, src: str | None = None) -> Ipv4Path:
    return Ipv4Path(Encap.IPIP, str(ipaddress.IPv4Address(dst)), 0, src)


Endpoint = tuple[str, int]  # (dotted IPv4 address, UDP port): cheap to compare per packet


# --- the HA's records (draft 4.4.2, Req #4) ------------------------------------------------------------------


class Candidate(NamedTuple):
    """One packet that may carry a BU, as seen before IPsec: its ESP SPI and (low 32 bits of the)
    sequence number, the outer endpoint, and when it arrived."""

    spi: int
    seq: int
    endpoint: Endpoint
    at: float


class Taken(NamedTuple):
    """What ``OuterRecords.take`` chose, and why (``how``: "seq", "latest" or "none")."""

    candidate: Candidate | None
    how: str


#: ``inbound_seq(spi) -> the highest sequence number the engine authenticated on that inbound SA``
#: (its anti-replay right edge), or None. Api mode only; may raise ``EngineQueryError``.
InboundSeq = Callable[[int], "int | None"]


class OuterRecords:
    """Outer IPv4 endpoints recorded before IPsec and taken after authentication (Req #4).

    ``record`` keeps, per home address, the newest ``per_hoa`` candidates for ``lifetime``
    seconds. ``take`` (called when the mobility module handles an *authenticated* BU from that
    home address) chooses one and forgets the rest:

    * with the engine's answer (api mode, ``seq_of`` given): the candidate whose SPI and ESP
      sequence number are the ones the engine just authenticated ("seq") -- exact even when
      forged or replayed packets were recorded next to the genuine BU;
    * otherwise the newest fresh candidate that arrived after the last BU-SPI packet from the
      binding's own endpoint (``saw_bound``) ("latest"). A forged packet that arrives between the
      genuine BU and its processing (a few milliseconds) can win; the BA then goes to the forger,
      the MN retransmits, and the next BU -- recorded again -- wins. That is the limit of the
      draft's heuristic; see docs/dsmipv6.md.

    Garbage alone is never taken: nothing is taken without an authenticated BU, and its records
    expire (``expired`` counts them).
    """

    __slots__ = ("_pending", "_same_at", "bu_spi", "counts", "lifetime", "max_hoas", "per_hoa")

    def __init__(self, *, lifetime: float = PENDING_LIFETIME, per_hoa: int = MAX_CANDIDATES,
                 max_hoas: int = MAX_RECORDED_HOAS) -> None:
        self.lifetime = lifetime
        self.per_hoa = per_hoa
        self.max_hoas = max_hoas
        self._pending: dict[bytes, deque[Candidate]] = {}
        self._same_at: dict[bytes, float] = {}  # HoA -> last BU-SPI packet from the bound endpoint
        self.bu_spi: dict[bytes, int] = {}  # HoA -> SPI of the last taken record (heuristic lock)
        self.counts = {"recorded": 0, "taken": 0, "expired": 0, "discarded": 0, "evicted": 0}

    def record(self, hoa: bytes, spi: int, seq: int, endpoint: Endpoint, now: float) -> None:
        queue = self._pending.get(hoa)
        if queue is None:
            if len(self._pending) >= self.max_hoas:
                oldest = next(iter(self._pending))
                self.counts["evicted"] += len(self._pending.pop(oldest))
            queue = self._pending[hoa] = deque(maxlen=self.per_hoa)
        elif len(queue) == queue.maxlen:
            self.counts["discarded"] += 1
        queue.append(Candidate(spi, seq, endpoint, now))
        self.counts["recorded"] += 1

    def saw_bound(self, hoa: bytes, spi: int, now: float) -> bool:
        """A packet from the binding's own endpoint: on the HoA's BU SPI it is a refresh BU (or a
        spoof of one), and records older than it cannot be its source. True when it counted."""
        if self.bu_spi.get(hoa) != spi:
            return False
        self._same_at[hoa] = now
        return True

    def take(self, hoa: bytes, now: float, seq_of: InboundSeq | None = None) -> Taken:
        """The record of the authenticated BU from ``hoa`` (see the class docstring); the HoA's
        other records are dropped. ``seq_of`` raising is the caller's business."""
        queue = self._pending.pop(hoa, None)
        same_at = self._same_at.pop(hoa, float("-inf"))
        if not queue:
            return Taken(None, "none")
        fresh = [c for c in queue if now - c.at <= self.lifetime]
        self.counts["expired"] += len(queue) - len(fresh)
        chosen, how = None, "none"
        if seq_of is not None and fresh:
            chosen = _authenticated(fresh, seq_of)
            how = "seq" if chosen is not None else how
        if chosen is None:
            after = [c for c in fresh if c.at > same_at]
            if after:
                chosen, how = after[-1], "latest"
        if chosen is None:
            return Taken(None, "none")
        self.counts["taken"] += 1
        self.counts["discarded"] += len(fresh) - 1
        self.bu_spi[hoa] = chosen.spi
        return Taken(chosen, how)

    def discard(self, hoa: bytes) -> None:
        """Forget the records of ``hoa`` (a BU that did not come in UDP)."""
        queue = self._pending.pop(hoa, None)
        self._same_at.pop(hoa, None)
        if queue:
            self.counts["discarded"] += len(queue)

    def expire(self, now: float) -> int:
        """Drop records older than ``lifetime`` (garbage never followed by an authenticated BU).
        Returns how many; cheap enough to call once a second."""
        gone = 0
        for hoa in list(self._pending):
            queue = self._pending[hoa]
            while queue and now - queue[0].at > self.lifetime:
                queue.popleft()
                gone += 1
            if not queue:
                del self._pending[hoa]
        self.counts["expired"] += gone
        return gone

    def pending(self, hoa: bytes) -> list[Candidate]:
        return list(self._pending.get(hoa, ()))

    def __len__(self) -> int:
        return sum(len(q) for q in self._pending.values())


def _authenticated(fresh: list[Candidate], seq_of: InboundSeq) -> Candidate | None:
    """The first-arrived candidate whose (SPI, sequence number) is the engine's anti-replay right
    edge of that SA (a replayed copy arrives after the original; a forged one is not authenticated
    and so never becomes the right edge)."""
    tops: dict[int, int | None] = {}
    for c in fresh:
        if c.spi not in tops:
            top = seq_of(c.spi)
            tops[c.spi] = None if top is None else top & 0xFFFFFFFF
        if tops[c.spi] == c.seq:
            return c
    return None


def endpoint_of(udp_source: Ipv4Endpoint | None) -> Endpoint | None:
    return None if udp_source is None else (str(udp_source.address), int(udp_source.port))


def to_ipv4_endpoint(endpoint: Endpoint) -> Ipv4Endpoint:
    return Ipv4Endpoint(ipaddress.IPv4Address(endpoint[0]), endpoint[1])


def esp_seq(packet: bytes, esp_at: int) -> int:
    """The ESP Sequence Number after the SPI (RFC 4303 2.2); 0 when the packet ends early."""
    if esp_at + 8 > len(packet):
        return 0
    return _SEQ.unpack_from(packet, esp_at + 4)[0]


# --- IPv4 / UDP headers ---------------------------------------------------------------------------------------


class Ipv4Outer(NamedTuple):
    src: str
    dst: str
    payload: bytes


def pull_ipv4_outer(packet: bytes, proto: int = IPPROTO_IPV6_IN_IPV4) -> Ipv4Outer:
    """The IPv4 header of a packet read from a raw protocol-41 socket (the kernel has already
    reassembled it). Raises ParseError unless it is a whole IPv4 packet of protocol ``proto``."""
    if len(packet) < IPV4_HEADER_LEN:
        raise ParseError("truncated IPv4 header")
    vihl, _tos, total, _ident, frag, _ttl, p, _csum, src, dst = _V4.unpack_from(packet)
    ihl = (vihl & 0x0F) * 4
    if vihl >> 4 != 4 or ihl < IPV4_HEADER_LEN:
        raise ParseError("not an IPv4 header")
    if total > len(packet) or total < ihl:
        raise ParseError("IPv4 Total Length does not fit the packet")
    if frag & 0x3FFF:
        raise ParseError("IPv4 fragment")
    if p != proto:
        raise ParseError(f"IPv4 protocol {p}, not {proto}")
    return Ipv4Outer(_dotted(src), _dotted(dst), packet[ihl:total])


def _dotted(addr: bytes) -> str:
    return f"{addr[0]}.{addr[1]}.{addr[2]}.{addr[3]}"


def _packed4(addr: str | ipaddress.IPv4Address | bytes) -> bytes:
    if isinstance(addr, bytes) and len(addr) == 4:
        return addr
    return ipaddress.IPv4Address(addr).packed


def push_ipip(src: str | bytes, dst: str | bytes, payload: bytes, ttl: int = 64) -> bytes:
    """IPv4 (protocol 41) | ``payload`` (RFC 4213 3.5)."""
    head = push_ipv4_header(_packed4(src), _packed4(dst), IPPROTO_IPV6_IN_IPV4,
                            IPV4_HEADER_LEN + len(payload), ttl=ttl)
    return head + payload


def push_udp4(src: str | bytes, sport: int, dst: str | bytes, dport: int, payload: bytes, ttl: int = 64) -> bytes:
    """IPv4 | UDP (checksum computed, RFC 768) | ``payload``: what the UDP socket puts on the wire,
    for tests and captures."""
    s, d = _packed4(src), _packed4(dst)
    length = UDP_HEADER_LEN + len(payload)
    pseudo = s + d + struct.pack("!BBH", 0, IPPROTO_UDP, length)
    udp = bytearray(_UDP.pack(sport, dport, length, 0) + payload)
    csum = _ones_complement(pseudo + bytes(udp)) or 0xFFFF  # 0 means "no checksum" (RFC 768)
    udp[6:8] = struct.pack("!H", csum)
    return push_ipv4_header(s, d, IPPROTO_UDP, IPV4_HEADER_LEN + length, ttl=ttl) + bytes(udp)


def _ones_complement(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


__all__ = [
    "DSMIPV6_PORT",
    "DSMIPV6_RESERVE",
    "IPIP_OVERHEAD",
    "MAX_CANDIDATES",
    "PENDING_LIFETIME",
    "UDP4_OVERHEAD",
    "Candidate",
    "Encap",
    "Endpoint",
    "InboundSeq",
    "Ipv4Outer",
    "Ipv4Path",
    "OuterRecords",
    "Taken",
    "endpoint_of",
    "esp_seq",
    "ipip_path",
    "pull_ipv4_outer",
    "push_ipip",
    "push_udp4",
    "to_ipv4_endpoint",
    "udp_path",
]
