"""Security Policy Database (RFC 4301 section 4.4.1). Sans-I/O.

An ordered list of entries per direction, first match wins, ending in an explicit default entry
(DISCARD unless configured otherwise, RFC 4301 section 4.4.1 "Every SPD SHOULD have a nominal,
final entry that ... discards"). Entries speak of *local* and *remote* (RFC 4301 section 4.4):
for an outbound packet local is the source, for an inbound packet local is the destination.

Selector semantics (RFC 4301 section 4.4.1.1):

- addresses: one range per selector (a single address, a prefix or first-last), one family, or ANY;
- next layer protocol: one number or ANY;
- local/remote ports: a range, or ANY; a non-ANY port selector never matches a packet without
  ports (a non-initial fragment: RFC 4301 section 7);
- ICMP/ICMPv6 type and code: the 16-bit range ``type*256+code`` of section 4.4.1.1;
- Mobility Header type: one 8-bit MH type or ANY (section 4.4.1.1, RFC 4877 section 6).

This SPD is per direction, like setkey's ``-P in`` / ``-P out``: a type selector (ICMP, MH) applies
to the packets of that direction, so RFC 4877's "local_mh_type = BU, remote_mh_type = BAck" is an
OUT entry with MH type BU plus an IN entry with MH type BAck. OPAQUE is not a separate value: ANY
covers it (RFC 4301 section 4.4.1 "The ANY value encompasses the OPAQUE value").

Hot path: ``Spd.lookup`` is called for every packet. Results are kept in a bounded cache keyed on
the packet's selector tuple, flushed whenever the SPD changes; per-entry hit counters live in
mutable ``PolicyStats`` objects, never in the frozen entries.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

from .constants import Action, Direction, IpProto, Mode
from .errors import ConfigError
from .sa import IPAddress

if TYPE_CHECKING:
    from .ip import PacketSelectors

# --- Specification -------------------------------------------------------------------------------

_MAX_ADDR = {0: 2**128 - 1, 4: 2**32 - 1, 6: 2**128 - 1}
_ADDR_BITS = {4: 32, 6: 128}
MAX_PORT = 0xFFFF
MAX_ICMP = 0xFFFF  # type in the high octet, code in the low octet (RFC 4301 section 4.4.1.1)
#: Next layer protocols with two 16-bit ports at the start of their header.
PORT_PROTOCOLS = frozenset({6, 17, 33, 132, 136})  # TCP, UDP, DCCP, SCTP, UDP-Lite
ICMP_PROTOCOLS = frozenset({IpProto.ICMP, IpProto.ICMPV6})

# --- Implementation ------------------------------------------------------------------------------

DEFAULT_CACHE_SIZE = 4096  # selector tuples remembered per direction before the cache is flushed


class Level(str, Enum):
    """How strictly a PROTECT entry wants its SA (setkey's level word)."""

    REQUIRE = "require"  # no SA -> drop; inbound cleartext -> drop
    USE = "use"  # no SA -> send in the clear; inbound cleartext accepted
    UNIQUE = "unique"  # as REQUIRE, and the SA is bound by reqid ("unique:N")


# --- selectors -------------------------------------------------------------------------------------


def _addr(value: IPAddress | str) -> IPAddress:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(f"bad IP address {value!r}") from None


@dataclass(frozen=True, slots=True)
class AddressRange:
    """An inclusive range of addresses of one family, stored as ints for fast compares.

    ``version`` 0 is ANY address of any family (the default entry's selector).
    """

    version: int
    first: int
    last: int

    def __post_init__(self) -> None:
        top = _MAX_ADDR.get(self.version)
        if top is None:
            raise ConfigError(f"address family must be 4, 6 or 0 (any), not {self.version!r}")
        if not 0 <= self.first <= self.last <= top:
            raise ConfigError(f"bad IPv{self.version} address range {self.first}..{self.last}")

    @classmethod
    def any(cls, version: int = 0) -> AddressRange:
        """ANY address of ``version`` (4 or 6), or of any family (0)."""
        return cls(version, 0, _MAX_ADDR.get(version, -1))

    @classmethod
    def single(cls, addr: IPAddress | str) -> AddressRange:
        a = _addr(addr)
        return cls(a.version, int(a), int(a))

    @classmethod
    def prefix(cls, net: ipaddress.IPv4Network | ipaddress.IPv6Network | str) -> AddressRange:
        """A prefix such as ``2001:db8::/64``; host bits must be zero."""
        if isinstance(net, str):
            try:
                net = ipaddress.ip_network(net, strict=True)
            except ValueError as exc:
                raise ConfigError(f"bad prefix {net!r}: {exc}") from None
        return cls(net.version, int(net.network_address), int(net.broadcast_address))

    @classmethod
    def between(cls, first: IPAddress | str, last: IPAddress | str) -> AddressRange:
        """The inclusive range ``first``..``last`` (RFC 4301 "low and high values, inclusive")."""
        a, b = _addr(first), _addr(last)
        if a.version != b.version:
            raise ConfigError(f"address range {a}-{b} mixes IPv4 and IPv6")
        if int(a) > int(b):
            raise ConfigError(f"address range {a}-{b} is empty (first > last)")
        return cls(a.version, int(a), int(b))

    @classmethod
    def parse(cls, text: str) -> AddressRange:
        """``any``, ``any4``, ``any6``, an address, ``addr/len`` or ``first-last``."""
        if text == "any":
            return cls.any()
        if text in ("any4", "any6"):
            return cls.any(int(text[3]))
        if "-" in text:
            first, _, last = text.partition("-")
            return cls.between(first, last)
        if "/" in text:
            return cls.prefix(text)
        return cls.single(text)

    @property
    def is_any(self) -> bool:
        return self.first == 0 and self.last == _MAX_ADDR[self.version]

    def contains(self, version: int, addr: int) -> bool:
        """Does address ``addr`` (an int) of IP ``version`` fall in this range?"""
        return (self.version == version or self.version == 0) and self.first <= addr <= self.last

    def contains_address(self, addr: IPAddress) -> bool:
        return self.contains(addr.version, int(addr))

    def _prefix_len(self) -> int | None:
        """The prefix length if this range is exactly one CIDR block, else None."""
        bits = _ADDR_BITS[self.version]
        size = self.last - self.first + 1
        if size & (size - 1) or self.first % size:
            return None
        return bits - (size.bit_length() - 1)

    def __str__(self) -> str:
        if self.version == 0:
            return "any"
        make = ipaddress.IPv4Address if self.version == 4 else ipaddress.IPv6Address
        plen = self._prefix_len()
        if plen == _ADDR_BITS[self.version]:
            return str(make(self.first))
        if plen is not None:
            return f"{make(self.first)}/{plen}"
        return f"{make(self.first)}-{make(self.last)}"


@dataclass(frozen=True, slots=True)
class PortRange:
    """An inclusive range of 16-bit ports; the default is ANY."""

    first: int = 0
    last: int = MAX_PORT

    ANY: ClassVar[PortRange]

    def __post_init__(self) -> None:
        if not 0 <= self.first <= self.last <= MAX_PORT:
            raise ConfigError(f"bad port range {self.first}-{self.last}")

    @classmethod
    def single(cls, port: int) -> PortRange:
        return cls(port, port)

    @property
    def is_any(self) -> bool:
        return self.first == 0 and self.last == MAX_PORT

    def contains(self, port: int | None) -> bool:
        """ANY also matches an absent port (RFC 4301 section 4.4.1, OPAQUE and ANY)."""
        if port is None:
            return self.is_any
        return self.first <= port <= self.last

    def __str__(self) -> str:
        if self.is_any:
            return "any"
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


PortRange.ANY = PortRange()


@dataclass(frozen=True, slots=True)
class IcmpRange:
    """ICMP/ICMPv6 type and code as the 16-bit range of RFC 4301 section 4.4.1.1.

    A packet with type t and code c matches when ``first <= t*256 + c <= last``. This holds a
    single type with a range of codes, a single type with ANY code, or ANY type and code.
    """

    first: int = 0
    last: int = MAX_ICMP

    def __post_init__(self) -> None:
        if not 0 <= self.first <= self.last <= MAX_ICMP:
            raise ConfigError(f"bad ICMP type/code range {self.first:#06x}-{self.last:#06x}")

    @classmethod
    def of(cls, icmp_type: int, code: int | None = None, code_last: int | None = None) -> IcmpRange:
        """Type ``icmp_type`` with code ``code`` (..``code_last``), or any code if ``code`` is None."""
        if not 0 <= icmp_type <= 255:
            raise ConfigError(f"ICMP type {icmp_type} out of range 0..255")
        lo = 0 if code is None else code
        hi = (255 if code is None else code) if code_last is None else code_last
        if not 0 <= lo <= hi <= 255:
            raise ConfigError(f"bad ICMP code range {lo}-{hi}")
        return cls(icmp_type * 256 + lo, icmp_type * 256 + hi)

    @property
    def is_any(self) -> bool:
        return self.first == 0 and self.last == MAX_ICMP

    def contains(self, icmp_type: int | None, code: int | None) -> bool:
        if icmp_type is None or code is None:
            return self.is_any
        return self.first <= icmp_type * 256 + code <= self.last

    def __str__(self) -> str:
        if self.is_any:
            return "any"
        t, lo, hi = self.first >> 8, self.first & 0xFF, self.last & 0xFF
        if self.last >> 8 != t:
            return f"{t},{lo}-{self.last >> 8},{hi}"
        if lo == 0 and hi == 255:
            return str(t)
        return f"{t},{lo}" if lo == hi else f"{t},{lo}-{hi}"


_PROTO_NAMES = {1: "icmp", 4: "ipv4", 6: "tcp", 17: "udp", 33: "dccp", 41: "ipv6", 47: "gre", 50: "esp",
                51: "ah", 58: "icmp6", 132: "sctp", 135: "mh", 136: "udplite"}


def _proto_name(proto: int | None) -> str:
    """setkey's word for a next layer protocol."""
    if proto is None:
        return "any"
    return _PROTO_NAMES.get(proto, str(proto))


@dataclass(frozen=True, slots=True)
class TrafficSelector:
    """One selector set of an SPD entry (RFC 4301 section 4.4.1.2).

    ``proto`` None is ANY. Ports only go with TCP/UDP/SCTP/DCCP/UDP-Lite, ``icmp`` only with
    ICMP/ICMPv6, ``mh_type`` only with the Mobility Header (135).
    """

    local: AddressRange
    remote: AddressRange
    proto: int | None = None
    local_port: PortRange = PortRange.ANY
    remote_port: PortRange = PortRange.ANY
    icmp: IcmpRange = IcmpRange()
    mh_type: int | None = None
    # (version, local first/last, remote first/last, proto): the address test as plain ints,
    # computed once so that the per-packet match makes no method calls
    _flat: tuple[int, int, int, int, int, int | None] = field(init=False, repr=False, compare=False)

    ANY: ClassVar[TrafficSelector]

    def __post_init__(self) -> None:
        self._validate()
        l, r = self.local, self.remote
        flat = (l.version or r.version, l.first, l.last, r.first, r.last, self.proto)
        object.__setattr__(self, "_flat", flat)

    def _validate(self) -> None:
        lv, rv = self.local.version, self.remote.version
        if lv and rv and lv != rv:
            raise ConfigError(
                f"local {self.local} and remote {self.remote} mix IPv4 and IPv6 (RFC 4301 4.4.1.1)"
            )
        if self.proto is not None and not 0 <= self.proto <= 255:
            raise ConfigError(f"next layer protocol {self.proto} out of range 0..255")
        name = _proto_name(self.proto)
        if not (self.local_port.is_any and self.remote_port.is_any) and self.proto not in PORT_PROTOCOLS:
            raise ConfigError(f"port selectors need tcp, udp, sctp, dccp or udplite, not {name}")
        if not self.icmp.is_any and self.proto not in ICMP_PROTOCOLS:
            raise ConfigError(f"an ICMP type selector needs icmp or icmp6, not {name}")
        if self.mh_type is not None:
            if self.proto != IpProto.MH:
                raise ConfigError(f"a Mobility Header type selector needs mh (135), not {name}")
            if not 0 <= self.mh_type <= 255:
                raise ConfigError(f"MH type {self.mh_type} out of range 0..255")

    @property
    def version(self) -> int:
        """4 or 6, or 0 when both addresses are ANY of any family."""
        return self.local.version or self.remote.version

    def matches(self, sel: PacketSelectors, outbound: bool) -> bool:
        """Does the packet with selector values ``sel`` match? ``outbound``: local = source."""
        version, lfirst, llast, rfirst, rlast, proto = self._flat
        if version and version != sel.version:
            return False
        if outbound:
            local, remote = sel.src, sel.dst
        else:
            local, remote = sel.dst, sel.src
        if not (lfirst <= local <= llast and rfirst <= remote <= rlast):
            return False
        if proto is None:
            return True
        if proto != sel.proto:
            return False
        if proto in PORT_PROTOCOLS:
            lport, rport = (sel.sport, sel.dport) if outbound else (sel.dport, sel.sport)
            return self.local_port.contains(lport) and self.remote_port.contains(rport)
        if proto == IpProto.MH:
            return self.mh_type is None or self.mh_type == sel.mh_type
        if proto in ICMP_PROTOCOLS:
            return self.icmp.contains(sel.icmp_type, sel.icmp_code)
        return True

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "local": str(self.local),
            "remote": str(self.remote),
            "proto": "any" if self.proto is None else self.proto,
        }
        if self.proto in PORT_PROTOCOLS:
            d["local_port"] = str(self.local_port)
            d["remote_port"] = str(self.remote_port)
        elif self.proto in ICMP_PROTOCOLS:
            d["icmp"] = str(self.icmp)
        elif self.proto == IpProto.MH:
            d["mh_type"] = "any" if self.mh_type is None else self.mh_type
        return d

    def __str__(self) -> str:
        text = f"local {self.local}"
        if not self.local_port.is_any:
            text += f"[{self.local_port}]"
        text += f" remote {self.remote}"
        if not self.remote_port.is_any:
            text += f"[{self.remote_port}]"
        text += f" {_proto_name(self.proto)}"
        if not self.icmp.is_any:
            text += f" {self.icmp}"
        if self.mh_type is not None:
            text += f" {self.mh_type}"
        return text


TrafficSelector.ANY = TrafficSelector(AddressRange.any(), AddressRange.any())


# --- entries ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpdEntry:
    """One SPD entry (RFC 4301 section 4.4.1.2): selectors -> PROTECT / BYPASS / DISCARD.

    For PROTECT: ``mode``; the outer ``tunnel_src``/``tunnel_dst`` in tunnel mode, written as the
    packets of this direction carry them (like setkey ``esp/tunnel/SRC-DST``); and how the SA is
    found, most specific first: ``spi`` (one SA), ``reqid`` (setkey ``unique:N``), else the tunnel
    endpoints, else (transport) the packet's own addresses. ``level`` USE lets traffic pass in the
    clear when no SA exists.
    """

    name: str
    direction: Direction
    selector: TrafficSelector
    action: Action
    mode: Mode | None = None
    tunnel_src: IPAddress | None = None
    tunnel_dst: IPAddress | None = None
    level: Level = Level.REQUIRE
    reqid: int | None = None
    spi: int | None = None

    def __post_init__(self) -> None:
        if self.action == Action.PROTECT:
            self._check_protect()
        elif any(x is not None for x in (self.mode, self.tunnel_src, self.tunnel_dst, self.reqid, self.spi)):
            raise ConfigError(f"policy {self.name}: only PROTECT entries take a mode, tunnel, reqid or SPI")

    def _check_protect(self) -> None:
        if self.mode is None:
            raise ConfigError(f"policy {self.name}: PROTECT needs a mode (transport or tunnel)")
        tunnel = self.mode == Mode.TUNNEL
        ends = (self.tunnel_src, self.tunnel_dst)
        if tunnel and None in ends:
            raise ConfigError(f"policy {self.name}: tunnel mode needs both tunnel endpoints")
        if not tunnel and ends != (None, None):
            raise ConfigError(f"policy {self.name}: transport mode takes no tunnel endpoints")
        if tunnel and self.tunnel_src.version != self.tunnel_dst.version:  # type: ignore[union-attr]
            raise ConfigError(f"policy {self.name}: tunnel endpoints mix IPv4 and IPv6")
        if self.level == Level.UNIQUE and self.reqid is None:
            raise ConfigError(f"policy {self.name}: level unique needs a reqid (unique:N)")

    @property
    def accepts_cleartext(self) -> bool:
        """May an inbound packet matching this entry arrive without ESP?"""
        if self.action == Action.PROTECT:
            return self.level == Level.USE
        return self.action == Action.BYPASS

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "direction": self.direction.value,
            "selector": self.selector.to_dict(),
            "action": self.action.value,
        }
        if self.action == Action.PROTECT:
            d["mode"] = self.mode.value  # type: ignore[union-attr]
            d["level"] = self.level.value
            if self.mode == Mode.TUNNEL:
                d["tunnel_src"] = str(self.tunnel_src)
                d["tunnel_dst"] = str(self.tunnel_dst)
            d["reqid"] = self.reqid
            d["spi"] = self.spi
        return d

    def __str__(self) -> str:
        text = f"{self.name}: {self.direction.value} {self.selector} -> {self.action.value}"
        if self.action == Action.PROTECT:
            ends = f"{self.tunnel_src}-{self.tunnel_dst}" if self.mode == Mode.TUNNEL else ""
            level = f"unique:{self.reqid}" if self.level == Level.UNIQUE else self.level.value
            text += f" esp/{self.mode.value}/{ends}/{level}"  # type: ignore[union-attr]
        return text


def default_entry(direction: Direction, action: Action) -> SpdEntry:
    """The final catch-all entry of ``direction`` (RFC 4301 section 4.4.1)."""
    if action == Action.PROTECT:
        raise ConfigError("the default SPD entry must be DISCARD or BYPASS")
    return SpdEntry(f"default-{direction.value}", direction, TrafficSelector.ANY, action)


@dataclass(slots=True)
class PolicyStats:
    """Mutable per-entry counters (the entries themselves are frozen)."""

    hits: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"hits": self.hits}


# --- the database ----------------------------------------------------------------------------------

_Hit = tuple[SpdEntry, PolicyStats]


class Spd:
    """The ordered SPD of one node: entries per direction plus a final default entry each.

    ``generation`` increases on every change so that caches built on the SPD (here and in
    ``bits.sad.PolicyDb``) know when to flush.
    """

    def __init__(
        self,
        entries: Iterable[SpdEntry] = (),
        *,
        default_in: Action = Action.DISCARD,
        default_out: Action = Action.DISCARD,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self._entries: list[SpdEntry] = []
        self._stats: dict[str, PolicyStats] = {}
        self._defaults = {
            Direction.IN: default_entry(Direction.IN, default_in),
            Direction.OUT: default_entry(Direction.OUT, default_out),
        }
        for d in self._defaults.values():
            self._stats[d.name] = PolicyStats()
        self._by_dir: dict[Direction, tuple[SpdEntry, ...]] = {Direction.IN: (), Direction.OUT: ()}
        self._caches: dict[Direction, dict[Any, _Hit]] = {Direction.IN: {}, Direction.OUT: {}}
        self._cache_size = max(1, cache_size)
        self.cache_hits = 0
        self.cache_misses = 0
        self.generation = 0
        for entry in entries:
            self.add(entry)

    # --- changes (each one flushes the caches) ---

    def add(self, entry: SpdEntry, *, before: str | None = None) -> None:
        """Append ``entry`` (or insert it before the entry named ``before``)."""
        if entry.name in self._stats:
            raise ConfigError(f"duplicate SPD entry name {entry.name!r}")
        if before is None:
            self._entries.append(entry)
        else:
            self._entries.insert(self._index(before), entry)
        self._stats[entry.name] = PolicyStats()
        self._changed()

    def remove(self, name: str) -> SpdEntry:
        entry = self._entries.pop(self._index(name))
        del self._stats[name]
        self._changed()
        return entry

    def clear(self) -> None:
        """Remove every entry except the two defaults (setkey ``spdflush``)."""
        for entry in self._entries:
            del self._stats[entry.name]
        self._entries.clear()
        self._changed()

    def set_default(self, direction: Direction, action: Action) -> None:
        old = self._defaults[direction]
        self._defaults[direction] = default_entry(direction, action)
        self._stats[old.name] = PolicyStats()
        self._changed()

    def _index(self, name: str) -> int:
        for i, entry in enumerate(self._entries):
            if entry.name == name:
                return i
        raise ConfigError(f"no SPD entry named {name!r}")

    def _changed(self) -> None:
        for d in (Direction.IN, Direction.OUT):
            self._by_dir[d] = tuple(e for e in self._entries if e.direction == d)
            self._caches[d].clear()
        self.generation += 1

    # --- queries ---

    def lookup(self, direction: Direction, sel: PacketSelectors) -> SpdEntry:
        """The first entry of ``direction`` matching ``sel``, or the default entry. Hot path."""
        cache = self._caches[direction]
        hit = cache.get(sel)
        if hit is None:
            self.cache_misses += 1
            hit = self._search(direction, sel)
            if len(cache) >= self._cache_size:
                cache.clear()  # simple bound: a flush costs one re-scan per live flow
            cache[sel] = hit
        else:
            self.cache_hits += 1
        hit[1].hits += 1
        return hit[0]

    def _search(self, direction: Direction, sel: PacketSelectors) -> _Hit:
        outbound = direction == Direction.OUT
        for entry in self._by_dir[direction]:
            if entry.selector.matches(sel, outbound):
                return entry, self._stats[entry.name]
        entry = self._defaults[direction]
        return entry, self._stats[entry.name]

    def entries(self, direction: Direction | None = None) -> tuple[SpdEntry, ...]:
        """Configured entries in order (without the defaults), of one direction or all."""
        return tuple(self._entries) if direction is None else self._by_dir[direction]

    def default(self, direction: Direction) -> SpdEntry:
        return self._defaults[direction]

    def get(self, name: str) -> SpdEntry | None:
        for entry in self._entries:
            if entry.name == name:
                return entry
        d = self._defaults
        return next((e for e in d.values() if e.name == name), None)

    def stats(self, name: str) -> PolicyStats:
        try:
            return self._stats[name]
        except KeyError:
            raise ConfigError(f"no SPD entry named {name!r}") from None

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[SpdEntry]:
        return iter(tuple(self._entries))

    def to_dict(self) -> dict[str, Any]:
        """The whole SPD with counters, in lookup order, for a control socket."""
        out: dict[str, Any] = {}
        for d in (Direction.OUT, Direction.IN):
            rows = [*self._by_dir[d], self._defaults[d]]
            out[d.value] = [{**e.to_dict(), **self._stats[e.name].to_dict()} for e in rows]
        out["cache"] = {"hits": self.cache_hits, "misses": self.cache_misses}
        return out


__all__ = [
    "AddressRange",
    "IcmpRange",
    "Level",
    "PolicyStats",
    "PortRange",
    "Spd",
    "SpdEntry",
    "TrafficSelector",
    "default_entry",
    "PORT_PROTOCOLS",
]
