"""Security Association Database (RFC 4301 section 4.4.2) and the SPD/SAD glue. Sans-I/O.

``Sad`` holds SA objects of any type with a ``.params: SaParams`` attribute (the ESP engine's
``SecurityAssociation``; tests use plain records). Inbound SAs are found by SPI alone, as RFC 4301
section 4.1 requires for unicast; only when two inbound SAs share an SPI does the destination
address decide. Outbound SAs are indexed by SPI, reqid and (mode, source, destination) so that
resolving a PROTECT entry to its SA is a dictionary lookup.

``PolicyDb`` ties one ``Spd`` to one ``Sad``:

- ``lookup_outbound(sel)`` -> (entry, SA or None): the per-packet outbound decision, cached per
  selector tuple (so per flow) and flushed when either database changes;
- ``check_inbound(sa, sel)``: does a decrypted packet match the selectors of the inbound policy
  its SA serves (RFC 4301 section 5.2 step 4)?
- ``query_outbound`` / ``query_inbound_spi``: the query interface of the draft (sections 4.3.2 and
  4.4.2) with plain results that render to JSON.

How a PROTECT entry and an SA are tied (same rule both ways), in order:

1. the entry names an ``spi``: that SA;
2. the entry names a ``reqid`` (setkey ``unique:N``): SAs with that reqid (setkey ``-u N``);
3. tunnel mode: SAs whose source/destination are the entry's tunnel endpoints;
4. transport mode: SAs whose source/destination are the packet's addresses; for an inbound
   entry, SAs whose source lies in its remote range and destination in its local range.

The SA must also have the entry's direction and mode. Several candidates: the newest wins.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, Protocol, TypeVar

from .constants import Action, Direction, Mode
from .errors import ConfigError
from .sa import IPAddress, SaParams
from .spd import DEFAULT_CACHE_SIZE, PolicyStats, Spd, SpdEntry, TrafficSelector

if TYPE_CHECKING:
    from .ip import PacketSelectors


class HasParams(Protocol):
    """Anything the SAD can hold: the ESP engine's SA object, or a test record."""

    @property
    def params(self) -> SaParams: ...


SaT = TypeVar("SaT", bound=HasParams)

_PairKey = tuple[Mode, int, int, int]  # mode, IP version, source, destination (ints)


def _pair_key(p: SaParams) -> _PairKey:
    return (p.mode, p.src.version, int(p.src), int(p.dst))


def sa_serves(entry: SpdEntry, p: SaParams) -> bool:
    """Can the SA with parameters ``p`` carry traffic of the PROTECT ``entry``? (module docstring)"""
    if entry.action != Action.PROTECT or p.direction != entry.direction or p.mode != entry.mode:
        return False
    if entry.spi is not None:
        return p.spi == entry.spi
    if entry.reqid is not None:
        return p.reqid == entry.reqid
    if entry.mode == Mode.TUNNEL:
        return p.src == entry.tunnel_src and p.dst == entry.tunnel_dst
    sel = entry.selector
    src, dst = (sel.local, sel.remote) if entry.direction == Direction.OUT else (sel.remote, sel.local)
    return src.contains_address(p.src) and dst.contains_address(p.dst)


class Sad(Generic[SaT]):
    """All SAs of a node. ``generation`` increases on every change."""

    def __init__(self, sas: Iterable[SaT] = ()) -> None:
        self._sas: list[SaT] = []
        self._in: dict[int, list[SaT]] = {}  # SPI -> inbound SAs with that SPI
        self._in_unique: dict[int, SaT] = {}  # SPI -> the one inbound SA (fast path)
        self._out_spi: dict[int, list[SaT]] = {}
        self._out_reqid: dict[int, list[SaT]] = {}
        self._out_pair: dict[_PairKey, list[SaT]] = {}
        self.generation = 0
        for sa in sas:
            self.add(sa)

    def add(self, sa: SaT) -> None:
        """Add ``sa``. The pair (SPI, destination) must be new in its direction."""
        p = sa.params
        for other in self._sas:
            q = other.params
            if q.spi == p.spi and q.dst == p.dst and q.direction == p.direction:
                raise ConfigError(
                    f"duplicate SPI {p.spi:#010x} for destination {p.dst} ({p.direction.value})"
                )
        self._sas.append(sa)
        self._reindex()

    def remove(self, sa: SaT) -> None:
        try:
            self._sas.remove(sa)
        except ValueError:
            raise ConfigError(f"SA {sa.params.spi:#010x} is not in the SAD") from None
        self._reindex()

    def replace(self, old: SaT, new: SaT) -> None:
        """Swap ``old`` for ``new`` in place, e.g. the HA moving an SA's destination to the new CoA
        after an accepted Binding Update (RFC 3776 section 4.1, draft section 4.1)."""
        try:
            i = self._sas.index(old)
        except ValueError:
            raise ConfigError(f"SA {old.params.spi:#010x} is not in the SAD") from None
        self._sas[i] = new
        self._reindex()

    def clear(self) -> None:
        """Remove every SA (setkey ``flush``)."""
        self._sas.clear()
        self._reindex()

    def _reindex(self) -> None:
        self._in, self._out_spi, self._out_reqid, self._out_pair = {}, {}, {}, {}
        for sa in self._sas:
            p = sa.params
            if p.direction == Direction.IN:
                self._in.setdefault(p.spi, []).append(sa)
                continue
            self._out_spi.setdefault(p.spi, []).append(sa)
            if p.reqid is not None:
                self._out_reqid.setdefault(p.reqid, []).append(sa)
            self._out_pair.setdefault(_pair_key(p), []).append(sa)
        self._in_unique = {spi: sas[0] for spi, sas in self._in.items() if len(sas) == 1}
        self.generation += 1

    # --- lookups ---

    def get_inbound(self, spi: int, dst: int | None = None) -> SaT | None:
        """The inbound SA for ``spi`` (RFC 4301 section 4.1: SPI alone for unicast). ``dst`` (the
        outer destination as an int) only decides between inbound SAs sharing that SPI. Hot path."""
        sa = self._in_unique.get(spi)
        if sa is not None or dst is None:
            return sa
        for cand in reversed(self._in.get(spi, ())):
            if int(cand.params.dst) == dst:
                return cand
        return None

    def get_outbound(self, spi: int, dst: IPAddress | None = None) -> SaT | None:
        """The newest outbound SA with ``spi`` (and destination ``dst`` when given)."""
        for sa in reversed(self._out_spi.get(spi, ())):
            if dst is None or sa.params.dst == dst:
                return sa
        return None

    def outbound_by_reqid(self, reqid: int, mode: Mode | None = None) -> SaT | None:
        """The newest outbound SA with ``reqid`` (setkey ``-u``) and, if given, ``mode``."""
        for sa in reversed(self._out_reqid.get(reqid, ())):
            if mode is None or sa.params.mode == mode:
                return sa
        return None

    def outbound_by_addresses(self, mode: Mode, version: int, src: int, dst: int) -> SaT | None:
        """The newest outbound SA of ``mode`` from ``src`` to ``dst`` (addresses as ints)."""
        sas = self._out_pair.get((mode, version, src, dst))
        return sas[-1] if sas else None

    def find(self, spi: int, direction: Direction | None = None) -> list[SaT]:
        """Every SA with ``spi`` (management and tests; not for the hot path)."""
        return [
            sa for sa in self._sas if sa.params.spi == spi and direction in (None, sa.params.direction)
        ]

    def inbound(self) -> tuple[SaT, ...]:
        return tuple(sa for sa in self._sas if sa.params.direction == Direction.IN)

    def outbound(self) -> tuple[SaT, ...]:
        return tuple(sa for sa in self._sas if sa.params.direction == Direction.OUT)

    def __iter__(self) -> Iterator[SaT]:
        return iter(tuple(self._sas))

    def __len__(self) -> int:
        return len(self._sas)


# --- query results -----------------------------------------------------------------------------------


def _sa_dict(p: SaParams) -> dict[str, Any]:
    """The non-secret parameters of an SA (never keys)."""
    return {
        "spi": p.spi,
        "spi_hex": f"{p.spi:#010x}",
        "direction": p.direction.value,
        "mode": p.mode.value,
        "src": str(p.src),
        "dst": str(p.dst),
        "enc": p.enc.value,
        "auth": p.auth.value,
        "esn": p.esn,
        "replay_window": p.replay_window,
        "reqid": p.reqid,
    }


class OutboundAnswer(NamedTuple):
    """Which SPD entry and which SA would handle an outbound packet (draft section 4.3.2)."""

    entry: SpdEntry
    spi: int | None
    sa: SaParams | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.entry.to_dict(),
            "spi": self.spi,
            "sa": None if self.sa is None else _sa_dict(self.sa),
        }


@dataclass(frozen=True, slots=True)
class InboundAnswer:
    """An inbound SA's mode, endpoints and traffic selectors (draft section 4.4.2)."""

    spi: int
    mode: Mode
    src: IPAddress
    dst: IPAddress
    reqid: int | None
    selectors: tuple[TrafficSelector, ...]
    policies: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "spi": self.spi,
            "spi_hex": f"{self.spi:#010x}",
            "mode": self.mode.value,
            "src": str(self.src),
            "dst": str(self.dst),
            "reqid": self.reqid,
            "selectors": [ts.to_dict() for ts in self.selectors],
            "policies": list(self.policies),
        }


# --- SPD + SAD ---------------------------------------------------------------------------------


class PolicyDb(Generic[SaT]):
    """One SPD with one SAD: outbound SA resolution, inbound selector checks, queries."""

    def __init__(self, spd: Spd, sad: Sad[SaT], *, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.spd = spd
        self.sad = sad
        self._spd_gen = self._sad_gen = -1
        self._cache_size = max(1, cache_size)
        # selector tuple -> ((entry, SA), the entry's counters)
        self._flows: dict[Any, tuple[tuple[SpdEntry, SaT | None], PolicyStats]] = {}
        # id(sa) -> (sa, its inbound entries with their counters)
        self._bound: dict[int, tuple[SaT, tuple[tuple[SpdEntry, PolicyStats], ...]]] = {}
        self._fresh()

    def _fresh(self) -> None:
        """Flush every derived cache if the SPD or the SAD changed since they were built."""
        if self.spd.generation != self._spd_gen or self.sad.generation != self._sad_gen:
            self._spd_gen, self._sad_gen = self.spd.generation, self.sad.generation
            self._flows.clear()
            self._bound.clear()

    # --- outbound ---

    def lookup_outbound(self, sel: PacketSelectors) -> tuple[SpdEntry, SaT | None]:
        """The OUT entry for ``sel`` and, for PROTECT, the SA to use (None: no SA). Hot path.

        Each new selector tuple (flow) costs one SPD lookup and one SA resolution; later packets of
        the flow cost one dictionary lookup plus the entry's hit counter.
        """
        self._fresh()
        hit = self._flows.get(sel)
        if hit is not None:
            hit[1].hits += 1
            return hit[0]
        entry = self.spd.lookup(Direction.OUT, sel)  # counts this packet
        sa = self.resolve_outbound(entry, sel) if entry.action == Action.PROTECT else None
        if len(self._flows) >= self._cache_size:
            self._flows.clear()
        self._flows[sel] = ((entry, sa), self.spd.stats(entry.name))
        return entry, sa

    def resolve_outbound(self, entry: SpdEntry, sel: PacketSelectors) -> SaT | None:
        """The SA that protects ``sel`` under the PROTECT ``entry`` (rules in the module docstring)."""
        sad, mode = self.sad, entry.mode
        if mode is None:
            return None
        if entry.spi is not None:
            sa = sad.get_outbound(entry.spi)
            return sa if sa is not None and sa_serves(entry, sa.params) else None
        if entry.reqid is not None:
            return sad.outbound_by_reqid(entry.reqid, mode)
        if mode == Mode.TUNNEL:
            src, dst = entry.tunnel_src, entry.tunnel_dst
            assert src is not None and dst is not None  # SpdEntry guarantees both in tunnel mode
            return sad.outbound_by_addresses(mode, src.version, int(src), int(dst))
        return sad.outbound_by_addresses(mode, sel.version, sel.src, sel.dst)

    # --- inbound ---

    def _bindings(self, sa: SaT) -> tuple[tuple[SpdEntry, PolicyStats], ...]:
        self._fresh()
        hit = self._bound.get(id(sa))
        if hit is not None and hit[0] is sa:
            return hit[1]
        p, spd = sa.params, self.spd
        bound = tuple((e, spd.stats(e.name)) for e in spd.entries(Direction.IN) if sa_serves(e, p))
        self._bound[id(sa)] = (sa, bound)  # the SA is kept alive here, so its id stays unique
        return bound

    def inbound_policies(self, sa: SaT) -> tuple[SpdEntry, ...]:
        """The IN PROTECT entries the inbound ``sa`` serves, in SPD order."""
        return tuple(e for e, _ in self._bindings(sa))

    def check_inbound(self, sa: SaT, sel: PacketSelectors) -> bool:
        """RFC 4301 section 5.2 steps 4-5: does the decrypted packet ``sel`` (the inner packet in
        tunnel mode) match the selectors of a policy that ``sa`` serves? False -> discard.
        An SA bound to no policy (a manual SA without SPD entry) matches nothing. Hot path;
        a match counts as a hit of that policy."""
        for entry, stats in self._bindings(sa):
            if entry.selector.matches(sel, False):
                stats.hits += 1
                return True
        return False

    # --- queries (draft sections 4.3.2 and 4.4.2) ---

    def query_outbound(self, sel: PacketSelectors) -> OutboundAnswer:
        """Which entry, and which SA (SPI), would protect this outbound packet?

        Does not count as a hit: a query is not traffic.
        """
        self._fresh()
        hit = self._flows.get(sel)
        if hit is None:
            entry = next(
                (e for e in self.spd.entries(Direction.OUT) if e.selector.matches(sel, True)),
                self.spd.default(Direction.OUT),
            )
            sa = self.resolve_outbound(entry, sel) if entry.action == Action.PROTECT else None
        else:
            entry, sa = hit[0]
        if sa is None:
            return OutboundAnswer(entry, None, None)
        return OutboundAnswer(entry, sa.params.spi, sa.params)

    def query_inbound_spi(self, spi: int, dst: int | None = None) -> InboundAnswer | None:
        """The traffic selectors, mode and endpoints of the inbound SA ``spi`` (None: no such SA)."""
        sa = self.sad.get_inbound(spi, dst)
        if sa is None:
            return None
        p = sa.params
        entries = self.inbound_policies(sa)
        return InboundAnswer(
            spi=p.spi,
            mode=p.mode,
            src=p.src,
            dst=p.dst,
            reqid=p.reqid,
            selectors=tuple(e.selector for e in entries),
            policies=tuple(e.name for e in entries),
        )

    def candidates(self, entry: SpdEntry) -> list[SaT]:
        """Every SA that could serve ``entry`` (configuration checks, management)."""
        return [sa for sa in self.sad if sa_serves(entry, sa.params)]

    def to_dict(self) -> dict[str, Any]:
        """The SAD without keys, for a control socket."""
        return {"sad": [_sa_dict(sa.params) for sa in self.sad], "spd": self.spd.to_dict()}


__all__ = ["HasParams", "InboundAnswer", "OutboundAnswer", "PolicyDb", "Sad", "sa_serves"]
