"""Packet trace: one event per packet decision, filtered by a level (sans-I/O).

The engine owns a ``Tracer`` and tests ``tracer.wants_all`` (or ``wants_drops``) before it builds
any field, so a disabled trace costs one attribute read per packet::

    if tracer.wants_all:
        tracer.emit("encap", direction="out", spi=sa.spi, seq=seq, length=len(out))

``emit`` normalises the fields (addresses to text, enums to their values) into a plain dict and
hands it to a *sink*, a callable that the adapter supplies (``bits.io.tracefile.TraceWriter.write``
appends it to a JSON Lines file). The tracer reads no clock: the sink stamps the wall-clock
``time``.

Levels:

============  ==========================================================================
``off``       nothing
``drops``     events in ``NOTABLE_EVENTS``: drops, discards, errors, lifecycle, SA expiry
``all``       every decision, including per-packet ``encap``, ``decap``, ``bypass``
============  ==========================================================================
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any

from .errors import ConfigError

Record = dict[str, Any]
Sink = Callable[[Record], None]


class TraceLevel(IntEnum):
    OFF = 0
    DROPS = 1
    ALL = 2

    @classmethod
    def parse(cls, text: str | TraceLevel) -> TraceLevel:
        """``"off" | "drops" | "all"`` (case-insensitive) -> level; ConfigError otherwise."""
        if isinstance(text, TraceLevel):
            return text
        try:
            return cls[str(text).strip().upper()]
        except KeyError:
            raise ConfigError(f"trace level must be off, drops or all, got {text!r}") from None

    def __str__(self) -> str:
        return self.name.lower()


class TraceEventName(str, Enum):
    """Event names. Others are allowed (a string); these are the ones the tools know."""

    ENCAP = "encap"  # outbound packet protected with ESP
    DECAP = "decap"  # inbound ESP packet decrypted and accepted
    BYPASS = "bypass"  # passed in clear by a BYPASS policy
    DISCARD = "discard"  # dropped by a DISCARD policy
    DROP = "drop"  # dropped for a reason (``reason``: a DropReason value)
    ERROR = "error"  # a bug caught at the adapter: the packet was dropped (fail closed)
    START = "start"
    STOP = "stop"
    RELOAD = "reload"
    SA_SOFT = "sa-soft"  # soft lifetime reached
    SA_EXPIRED = "sa-expired"  # hard lifetime reached

    def __str__(self) -> str:
        return self.value


#: Events written at level ``drops`` (and ``all``); every other event needs level ``all``.
NOTABLE_EVENTS = frozenset(
    e.value
    for e in (
        TraceEventName.DISCARD,
        TraceEventName.DROP,
        TraceEventName.ERROR,
        TraceEventName.START,
        TraceEventName.STOP,
        TraceEventName.RELOAD,
        TraceEventName.SA_SOFT,
        TraceEventName.SA_EXPIRED,
    )
)

#: The schema, in the order fields are written. Absent (None) fields are left out of the record.
FIELDS = (
    "time",  # wall clock, seconds since the epoch (stamped by the sink)
    "component",  # "esp", "spd", "nfqueue", ...
    "direction",  # "out" | "in"
    "event",  # a TraceEventName value
    "reason",  # a DropReason value, for drop/discard
    "spi",
    "seq",
    "inner_src",
    "inner_dst",
    "outer_src",
    "outer_dst",
    "length",  # octets of the packet as it left the decision
    "queue",  # NFQUEUE number the packet came from
    "detail",  # free text (errors)
)
ADDRESS_FIELDS = frozenset({"inner_src", "inner_dst", "outer_src", "outer_dst"})


def address_text(value: object) -> str:
    """An address as text: packed bytes (4 or 16 octets), ipaddress objects or text.

    Ints are accepted but ambiguous (a small IPv6 int reads as IPv4): pass bytes when you can.
    """
    cls = value.__class__
    if cls is bytes or cls is bytearray or cls is memoryview:
        n = len(value)  # type: ignore[arg-type]
        if n == 4:
            return socket.inet_ntop(socket.AF_INET, value)  # type: ignore[arg-type]
        if n == 16:
            return socket.inet_ntop(socket.AF_INET6, value)  # type: ignore[arg-type]
        raise ValueError(f"{n}-octet address")
    if cls is str:
        return value  # type: ignore[return-value]
    return str(ipaddress.ip_address(value))  # type: ignore[arg-type]


class Tracer:
    """Filters events by level and passes them, as plain dicts, to a sink.

    ``queue`` is context the adapter sets before it hands a packet to the engine (only when
    ``wants_drops``), so events carry the queue without the engine knowing about NFQUEUE.
    """

    __slots__ = ("level", "wants_drops", "wants_all", "component", "queue", "_sink")

    def __init__(
        self, sink: Sink | None = None, level: TraceLevel | str = TraceLevel.OFF, component: str = "bits"
    ) -> None:
        self._sink = sink
        self.component = component
        self.queue: int | None = None
        self.set_level(level)

    def set_level(self, level: TraceLevel | str) -> None:
        self.level = TraceLevel.parse(level)
        on = self._sink is not None
        self.wants_drops = on and self.level >= TraceLevel.DROPS
        self.wants_all = on and self.level >= TraceLevel.ALL

    def emit(self, event: str | TraceEventName, **fields: object) -> None:
        """Record one event if the level asks for it. Never raises on odd field values.

        The record starts ``time`` (None: the sink stamps it), ``component``, ``event``, then the
        fields in the order given (None values left out), then ``queue``.
        """
        name = str(event)
        if not (self.wants_all or (self.wants_drops and name in NOTABLE_EVENTS)):
            return
        component = fields.pop("component", None) or self.component
        self._sink(make_record(name, component, self.queue, fields))  # type: ignore[misc]


def make_record(event: str, component: str, queue: int | None, fields: Mapping[str, object]) -> Record:
    """The dict for one event: addresses as text, enums as their values, None left out."""
    record: Record = {"time": None, "component": component, "event": event}
    for key, value in fields.items():
        if value is None:
            continue
        if key in ADDRESS_FIELDS:
            try:
                value = address_text(value)
            except (ValueError, TypeError):
                value = repr(value)
        elif isinstance(value, Enum):
            value = value.value
        record[key] = value
    if queue is not None and "queue" not in record:
        record["queue"] = queue
    return record


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One event as read back from a trace (what the renderers use)."""

    time: float | None = None
    component: str | None = None
    direction: str | None = None
    event: str | None = None
    reason: str | None = None
    spi: int | None = None
    seq: int | None = None
    inner_src: str | None = None
    inner_dst: str | None = None
    outer_src: str | None = None
    outer_dst: str | None = None
    length: int | None = None
    queue: int | None = None
    detail: str | None = None

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> TraceEvent:
        """Tolerant: unknown keys are ignored, missing ones are None."""
        return cls(**{k: record.get(k) for k in FIELDS})  # type: ignore[arg-type]

    def addresses(self) -> tuple[str, ...]:
        return tuple(a for a in (self.inner_src, self.inner_dst, self.outer_src, self.outer_dst) if a)
