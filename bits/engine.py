"""The BITS engine: SPD + SAD + ESP behind two calls, one per direction (RFC 4301 sections 5.1, 5.2).

Sans-I/O. An adapter (NFQUEUE, the offline pcap tool) hands it whole IP packets and ``now``; it
returns the packet to send (the *same object* when the packet passes unchanged, new bytes when it was
encapsulated or decapsulated) or a typed ``Drop``. Every drop is counted by reason and, when the
tracer asks for it, traced. Bad input never raises.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .constants import Action, Direction, IpProto
from .errors import ParseError
from .esp import SaLifetimeEvent, SecurityAssociation, flush_all, peek_spi_seq
from .ip import pull_esp_quick, pull_ip, pull_selectors, selectors_from_info
from .sa import SaParams
from .sad import PolicyDb
from .seqstore import SeqReserver
from .setkey import IpsecConfig
from .spd import Level, PolicyStats
from .trace import Tracer, TraceEventName
from .transforms import Rand
from .verdict import Drop, DropReason

_ESP = IpProto.ESP.value
_BYPASS, _DISCARD, _PROTECT = Action.BYPASS, Action.DISCARD, Action.PROTECT
_OUT, _IN = Direction.OUT, Direction.IN
_from_bytes = int.from_bytes
#: Bound of the inbound selector-check cache ((SA, inner selectors) -> matching policy's counters);
#: a full cache is flushed, which costs one policy walk per live flow.
CHECK_CACHE_SIZE = 4096


class Engine:
    """One node's IPsec processing: ``process_outbound`` / ``process_inbound``."""

    def __init__(self, policy: PolicyDb[SecurityAssociation], *, tracer: Tracer | None = None) -> None:
        self.policy = policy
        self.tracer = tracer if tracer is not None else Tracer()
        self.drops: dict[DropReason, int] = dict.fromkeys(DropReason, 0)
        self.counts = {"out_protected": 0, "out_bypass": 0, "in_decapsulated": 0, "in_bypass": 0}
        self.events: list[SaLifetimeEvent] = []
        self.on_event: Callable[[SaLifetimeEvent], None] | None = None
        # inbound: (SA, inner selectors) -> counters of the policy they match, or None (mismatch);
        # valid for one (policy db, SPD generation, SAD generation), see _check_inbound
        self._checks: dict[tuple[SecurityAssociation, Any], PolicyStats | None] = {}
        self._checks_for: tuple[Any, int, int] | None = None

    # --- outbound (RFC 4301 section 5.1) --------------------------------------------------------------

    def process_outbound(self, packet: bytes, now: float) -> bytes | Drop:
        try:
            sel = pull_selectors(packet)
        except ParseError as exc:
            return self._drop(Drop(DropReason.MALFORMED, detail=str(exc)), _OUT, packet)
        entry, sa = self.policy.lookup_outbound(sel)
        action = entry.action
        if action is _BYPASS:
            return self._bypass(_OUT, packet, entry.name)
        if action is _DISCARD:
            return self._drop(Drop(DropReason.DISCARD_POLICY, detail=entry.name), _OUT, packet)
        if sa is None:
            if entry.level is Level.USE:  # setkey "use": protect when an SA exists, else send as is
                return self._bypass(_OUT, packet, entry.name)
            return self._drop(Drop(DropReason.NO_SA, detail=entry.name), _OUT, packet)
        out = sa.encapsulate(packet, now)
        if sa.events:
            self._drain(sa)
        if out.__class__ is Drop:
            return self._drop(out, _OUT, packet)  # type: ignore[arg-type]
        self.counts["out_protected"] += 1
        if self.tracer.wants_all:
            self._trace(TraceEventName.ENCAP, _OUT, packet, outer=out, spi=sa.spi, seq=sa.seq)
        return out

    def _bypass(self, direction: Direction, packet: bytes, policy: str) -> bytes:
        self.counts["out_bypass" if direction is _OUT else "in_bypass"] += 1
        if self.tracer.wants_all:
            self._trace(TraceEventName.BYPASS, direction, packet, policy=policy)
        return packet

    # --- inbound (RFC 4301 section 5.2) ---------------------------------------------------------------

    def process_inbound(self, packet: bytes, now: float) -> bytes | Drop:
        quick = pull_esp_quick(packet)  # the common case: ESP right after a plain IP header
        if quick is not None:
            off, dst, spi, seq = quick
            return self._inbound_esp(packet, off, dst, spi, seq, now)
        try:
            info = pull_ip(packet)
            if info.proto == _ESP:
                off = info.l4_offset
                spi, seq = peek_spi_seq(packet, off)
                return self._inbound_esp(packet, off, _from_bytes(info.dst, "big"), spi, seq, now)
            sel = selectors_from_info(packet, info)
        except ParseError as exc:
            return self._drop(Drop(DropReason.MALFORMED, detail=str(exc)), _IN, packet)
        entry = self.policy.spd.lookup(_IN, sel)
        action = entry.action
        if action is _BYPASS or entry.accepts_cleartext:  # BYPASS, or PROTECT at level "use"
            return self._bypass(_IN, packet, entry.name)
        if action is _DISCARD:
            return self._drop(Drop(DropReason.DISCARD_POLICY, detail=entry.name), _IN, packet)
        # RFC 4301 5.2 step 3a: cleartext that policy says must arrive protected
        return self._drop(Drop(DropReason.CLEARTEXT_PROTECTED, detail=entry.name), _IN, packet)

    def _inbound_esp(self, packet: bytes, off: int, dst: int, spi: int, seq: int, now: float) -> bytes | Drop:
        """ESP at ``off`` for outer destination ``dst`` (an int): SAD, decapsulation, then the
        inner packet against the SA's policies (RFC 4301 section 5.2 steps 3b-5)."""
        sa = self.policy.sad.get_inbound(spi, dst)
        if sa is None:
            return self._drop(Drop(DropReason.UNKNOWN_SPI, spi, seq), _IN, packet)
        inner = sa.decapsulate(packet, off, now)
        if sa.events:
            self._drain(sa)
        if inner.__class__ is Drop:
            return self._drop(inner, _IN, packet)  # type: ignore[arg-type]
        try:
            sel = pull_selectors(inner)  # type: ignore[arg-type]
        except ParseError as exc:
            return self._drop(Drop(DropReason.MALFORMED, spi, seq, f"inner: {exc}"), _IN, packet)
        if not self._check_inbound(sa, sel):
            return self._drop(Drop(DropReason.SELECTOR_MISMATCH, spi, seq), _IN, packet, inner=inner)
        self.counts["in_decapsulated"] += 1
        if self.tracer.wants_all:
            self._trace(TraceEventName.DECAP, _IN, inner, outer=packet, spi=spi, seq=seq)  # type: ignore[arg-type]
        return inner  # type: ignore[return-value]

    def _check_inbound(self, sa: SecurityAssociation, sel: Any) -> bool:
        """``self.policy.check_inbound(sa, sel)`` with its answer cached per (SA, selectors).

        A hit counts the matching policy's hit as ``check_inbound`` does; the cache is flushed
        when the policy database is replaced or its SPD or SAD changes (their generations)."""
        policy = self.policy
        spd, sad = policy.spd, policy.sad
        valid = self._checks_for
        if valid is None or valid[0] is not policy or valid[1] != spd.generation or valid[2] != sad.generation:
            self._checks.clear()
            self._checks_for = (policy, spd.generation, sad.generation)
        key = (sa, sel)
        try:
            stats = self._checks[key]
        except KeyError:
            return self._check_inbound_miss(sa, sel, key)
        if stats is None:
            return False
        stats.hits += 1
        return True

    def _check_inbound_miss(self, sa: SecurityAssociation, sel: Any, key: tuple[Any, Any]) -> bool:
        """First packet of a flow on this SA: ask the policy database (which counts the hit) and
        remember which policy matched (the first of the SA's IN policies in SPD order)."""
        policy = self.policy
        ok = policy.check_inbound(sa, sel)
        stats = None
        if ok:
            entry = next(e for e in policy.inbound_policies(sa) if e.selector.matches(sel, False))
            stats = policy.spd.stats(entry.name)
        if len(self._checks) >= CHECK_CACHE_SIZE:
            self._checks.clear()
        self._checks[key] = stats
        return ok

    # --- timers and events ----------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """Earliest lifetime deadline over all SAs (absolute, monotonic seconds)."""
        deadlines = [t for sa in self.policy.sad if (t := sa.next_timer()) is not None]
        return min(deadlines, default=None)

    def handle_timer(self, now: float) -> None:
        for sa in self.policy.sad:
            sa.handle_timer(now)
            if sa.events:
                self._drain(sa)

    def _drain(self, sa: SecurityAssociation) -> None:
        for ev in sa.events:
            self.events.append(ev)
            name = TraceEventName.SA_SOFT if ev.kind == "soft" else TraceEventName.SA_EXPIRED
            self.tracer.emit(name, component="esp", spi=ev.spi, detail=ev.limit)
            if self.on_event is not None:
                self.on_event(ev)
        sa.events.clear()

    # --- drops and tracing ----------------------------------------------------------------------------

    def _drop(self, drop: Drop, direction: Direction, packet: bytes, inner: bytes | None = None) -> Drop:
        self.drops[drop.reason] += 1
        if self.tracer.wants_drops:
            event = TraceEventName.DISCARD if drop.reason is DropReason.DISCARD_POLICY else TraceEventName.DROP
            self._trace(
                event, direction, inner if inner is not None else packet, outer=packet if inner else None,
                spi=drop.spi, seq=drop.seq, reason=drop.reason.value, detail=drop.detail or None,
            )
        return drop

    def _trace(
        self, event: TraceEventName, direction: Direction, packet: bytes, *, outer: bytes | None = None,
        **fields: Any,
    ) -> None:
        """Only reached when tracing asks for this event: the formatting cost stays off the fast path."""
        fields.update(_addresses("inner", packet))
        if outer is not None and outer is not packet:
            fields.update(_addresses("outer", outer))
        fields.setdefault("length", len(outer if outer is not None else packet))
        self.tracer.emit(event, direction=direction.value, **fields)

    # --- management -------------------------------------------------------------------------------------

    def reconfigure(
        self, config: IpsecConfig, *, rand: Rand, now: float, reserver: SeqReserver | None = None
    ) -> None:
        """Replace SAs and policies (SIGHUP). An SA whose parameters did not change keeps its
        object, and so its sequence counter, replay window, lifetimes and statistics."""
        old = {sa.params: sa for sa in self.policy.sad}

        def make_sa(params: SaParams) -> SecurityAssociation:
            kept = old.get(params)
            return kept if kept is not None else SecurityAssociation(params, rand=rand, reserver=reserver, now=now)

        self.close()  # removed or re-keyed SAs leave their replay marks behind
        self.policy = config.policy_db(make_sa)

    def close(self) -> None:
        """Persist what must survive a restart (inbound replay right edges, see bits/esp.py)."""
        flush_all(self.policy.sad)  # every SA, then one SeqStoreError naming any that failed

    def status(self) -> dict[str, Any]:
        """Counters per SA, per SPD entry and per drop reason, JSON-able and without keys."""
        sas = [_sa_status(sa) for sa in self.policy.sad]
        return {
            "sas": sas,
            "policies": self.policy.spd.to_dict(),
            "drops": {r.value: n for r, n in self.drops.items() if n},
            "counts": dict(self.counts),
        }

    def query_outbound(self, sel: Any) -> dict[str, Any]:
        return self.policy.query_outbound(sel).to_dict()

    def query_inbound_spi(self, spi: int) -> dict[str, Any] | None:
        answer = self.policy.query_inbound_spi(spi)
        return None if answer is None else answer.to_dict()


def _addresses(prefix: str, packet: bytes) -> dict[str, bytes]:
    if len(packet) >= 40 and packet[0] >> 4 == 6:
        return {f"{prefix}_src": packet[8:24], f"{prefix}_dst": packet[24:40]}
    if len(packet) >= 20 and packet[0] >> 4 == 4:
        return {f"{prefix}_src": packet[12:16], f"{prefix}_dst": packet[16:20]}
    return {}


def _sa_status(sa: SecurityAssociation) -> dict[str, Any]:
    p, st = sa.params, sa.stats
    return {
        "spi": p.spi,
        "direction": p.direction.value,
        "mode": p.mode.value,
        "transform": sa.transform.name,
        "src": str(p.src),
        "dst": str(p.dst),
        "esn": p.esn,
        "seq": sa.seq if p.direction is Direction.OUT else sa.replay.top,
        "replay_window": p.replay_window,
        "packets": st.packets,
        "bytes": st.bytes,
        "replay_drops": st.replay_drops,
        "auth_failures": st.auth_failures,
        "other_drops": st.other_drops,
        "replay_save_errors": getattr(st, "replay_save_errors", 0),
        "soft_fired": sa.soft_fired,
        "hard_expired": sa.hard_expired,
        "added_at": sa.added_at,
        "soft": _lifetime(p.soft),
        "hard": _lifetime(p.hard),
    }


def _lifetime(lt: Any) -> dict[str, Any]:
    return {"bytes": lt.bytes, "packets": lt.packets, "seconds": lt.seconds}


def build_engine(
    config: IpsecConfig,
    *,
    rand: Rand,
    now: float,
    reserver: SeqReserver | None = None,
    tracer: Tracer | None = None,
) -> Engine:
    """An engine for a parsed setkey configuration: one ``SecurityAssociation`` (one cipher object)
    per SA. ``reserver`` persists outbound sequence numbers (see bits/seqstore.py)."""

    def make_sa(params: SaParams) -> SecurityAssociation:
        return SecurityAssociation(params, rand=rand, reserver=reserver, now=now)

    return Engine(config.policy_db(make_sa), tracer=tracer)
