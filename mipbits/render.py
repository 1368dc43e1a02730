"""Human-readable ``mipbits status`` and ``mipbits trace tail``.

Status schema: what ``bits.engine.Engine.status()`` returns, plus ``processor`` that the NFQUEUE
adapter adds. Every key is optional; unknown keys are ignored, missing ones print as ``-``::

    {"sas": [{"spi": 4096, "direction": "out", "mode": "tunnel", "transform": "aes-gcm-16",
              "src": "192.0.2.1", "dst": "192.0.2.2", "esn": false, "seq": 10,
              "replay_window": 64, "packets": 10, "bytes": 1240, "replay_drops": 0,
              "auth_failures": 0, "other_drops": 0, "soft_fired": false, "hard_expired": false,
              "added_at": 1234.5,            # monotonic seconds, compared with processor.monotonic
              "soft": {"seconds": null, "bytes": null, "packets": null},
              "hard": {"seconds": 3600, "bytes": null, "packets": null}}],
     "policies": {"out": [{"name": "sp1", "direction": "out",
                           "selector": {"local": "10.0.0.1/32", "remote": "10.0.0.2/32",
                                        "proto": 17, "local_port": "any", "remote_port": "53"},
                           "action": "protect", "mode": "tunnel", "level": "require",
                           "tunnel_src": "192.0.2.1", "tunnel_dst": "192.0.2.2",
                           "reqid": null, "spi": 4096, "hits": 10}],
                  "in": [...], "cache": {"hits": 9, "misses": 1}},
     "drops": {"replay": 2, "auth-failed": 1},
     "counts": {"out_protected": 10, "out_bypass": 0, "in_decapsulated": 9, "in_bypass": 0},
     "processor": {"pid": 123, "role": "both", "uptime": 12.5, "monotonic": 1300.0, "reloads": 0,
                   "queues": {"0": {"direction": "out", "accepted": 3, "modified": 10,
                                    "dropped": 1, "errors": 0}}}}

``policies`` may also be a plain list of rows. With two workers ``processor`` is
``{"role": "supervisor", "workers": {"out": {...}, "in": {...}}}``.
The layout follows ``ip -s xfrm state`` / ``swanctl --list-sas``: one block per SA.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import time
from collections import deque
from datetime import datetime
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import IO, Any

from bits.io.tracefile import DEFAULT_KEEP, TraceFollower, read_all, rotated_name
from bits.trace import TraceEvent

# -- colour --------------------------------------------------------------------------------------

_RESET = "\x1b[0m"
_COLOURS = {"red": "\x1b[31m", "green": "\x1b[32m", "yellow": "\x1b[33m", "blue": "\x1b[34m",
            "magenta": "\x1b[35m", "cyan": "\x1b[36m", "bold": "\x1b[1m", "dim": "\x1b[2m"}
EVENT_COLOURS = {"encap": "green", "decap": "cyan", "bypass": "dim", "discard": "yellow",
                 "drop": "red", "error": "magenta", "start": "bold", "stop": "bold", "reload": "bold",
                 "sa-soft": "yellow", "sa-expired": "red"}


def use_colour(stream: IO[str]) -> bool:
    """Colour on a terminal, plain when piped; NO_COLOR (no-color.org) turns it off."""
    return hasattr(stream, "isatty") and stream.isatty() and "NO_COLOR" not in os.environ


def _paint(text: str, colour: str | None, on: bool) -> str:
    if not on or not colour:
        return text
    return f"{_COLOURS[colour]}{text}{_RESET}"


# -- status --------------------------------------------------------------------------------------


def render_status(status: Mapping[str, Any], colour: bool = False) -> str:
    """The text of ``mipbits status``."""
    out: list[str] = []
    now = _monotonic(status.get("processor"))
    sas = status.get("sas") or []
    out.append(_paint(f"Security Associations ({len(sas)}):", "bold", colour))
    for sa in sas:
        out.extend(_sa_lines(sa, colour, now))
    if not sas:
        out.append("  none")
    rows = policy_rows(status.get("policies"))
    out.append(_paint(f"Policies ({len(rows)}):", "bold", colour))
    out.extend("  " + _policy_line(pol, i) for i, pol in enumerate(rows))
    if not rows:
        out.append("  none")
    out.append(_paint("Drops:", "bold", colour))
    drops = {k: v for k, v in (status.get("drops") or {}).items() if v}
    width = max((len(k) for k in drops), default=0)
    for reason, count in sorted(drops.items(), key=lambda kv: (-kv[1], kv[0])):
        out.append(f"  {_paint(reason.ljust(width), 'red', colour)}  {count}")
    if not drops:
        out.append("  none")
    counts = status.get("counts")
    if counts:
        out.append(_paint("Packets:", "bold", colour))
        out.append("  " + "  ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()))
    proc = status.get("processor")
    if proc:
        out.append(_paint("Processor:", "bold", colour))
        out.extend(_processor_lines(proc, "  "))
    return "\n".join(out) + "\n"


def _monotonic(proc: Any) -> float | None:
    """The processor's monotonic clock when it answered (lifetimes are measured on it)."""
    if not isinstance(proc, Mapping):
        return None
    if isinstance(proc.get("monotonic"), (int, float)):
        return float(proc["monotonic"])
    for worker in (proc.get("workers") or {}).values():
        found = _monotonic(worker)
        if found is not None:
            return found
    return None


def policy_rows(policies: Any) -> list[Mapping[str, Any]]:
    """Policy rows in lookup order: outbound first, then inbound."""
    if isinstance(policies, list):
        return policies
    if isinstance(policies, Mapping):
        return [row for d in ("out", "in", "fwd") for row in (policies.get(d) or [])]
    return []


def render_status_json(status: Mapping[str, Any]) -> str:
    return json.dumps(status, indent=2, sort_keys=True) + "\n"


def _get(d: Mapping[str, Any], key: str, fmt: Callable[[Any], str] = str) -> str:
    value = d.get(key)
    return "-" if value is None else fmt(value)


def _spi(value: Any) -> str:
    try:
        return f"0x{int(value):08x}"
    except (TypeError, ValueError):
        return str(value)


def _sa_lines(sa: Mapping[str, Any], colour: bool, now: float | None) -> list[str]:
    transform = sa.get("transform") or sa.get("enc") or "-"
    if sa.get("auth") not in (None, "none"):
        transform += f"/{sa['auth']}"
    head = (f"  {_paint(_spi(sa.get('spi')), 'cyan', colour)} {_get(sa, 'direction'):<3} "
            f"{_get(sa, 'mode')} esp {transform}  {_get(sa, 'src')} -> {_get(sa, 'dst')}")
    state = sa.get("state") or ("expired" if sa.get("hard_expired") else "dying" if sa.get("soft_fired") else None)
    if state:
        head += "  " + _paint(f"[{state}]", "red" if state == "expired" else "yellow", colour)
    seq_label = "highest seq" if sa.get("direction") == "in" else "seq"
    traffic = (f"    packets {_get(sa, 'packets')}  bytes {_get(sa, 'bytes', human_bytes)}  "
               f"{seq_label} {_get(sa, 'seq')}  replay-window {_get(sa, 'replay_window')}  "
               f"esn {'yes' if sa.get('esn') else 'no'}")
    replay = sa.get("replay_drops", sa.get("replay_failures"))
    failures = f"    replay failures {'-' if replay is None else replay}  auth failures {_get(sa, 'auth_failures')}"
    if sa.get("other_drops"):
        failures += f"  other drops {sa['other_drops']}"
    if sa.get("reqid") is not None:
        failures += f"  reqid {sa['reqid']}"
    left = sa["lifetime_left"] if "lifetime_left" in sa else lifetime_left(sa, sa.get("hard"), now)
    lines = [head, traffic, failures, f"    lifetime left: {lifetime_text(left)}"]
    soft = lifetime_left(sa, sa.get("soft"), now)
    if isinstance(soft, Mapping) and any(v is not None for v in soft.values()) and not sa.get("soft_fired"):
        lines[-1] += f"  (soft in {lifetime_text(soft)})"
    return lines


def lifetime_left(sa: Mapping[str, Any], limit: Any, now: float | None) -> Any:
    """What is left of one lifetime limit set, from the SA's usage, age and ``now``."""
    if not isinstance(limit, Mapping):
        return None
    left: dict[str, Any] = {"seconds": None, "bytes": None, "packets": None}
    if limit.get("seconds") is not None and now is not None and sa.get("added_at") is not None:
        left["seconds"] = max(0.0, limit["seconds"] - (now - sa["added_at"]))
    elif limit.get("seconds") is not None:
        left["seconds"] = f"{limit['seconds']}s total"
    for key in ("bytes", "packets"):
        if limit.get(key) is not None:
            left[key] = max(0, limit[key] - int(sa.get(key) or 0))
    return left


def lifetime_text(left: Any) -> str:
    """``{"seconds": 3590, "bytes": None, "packets": 10}`` -> ``59m50s, 10 packets``."""
    if not isinstance(left, Mapping):
        return "-" if left is None else str(left)
    parts = []
    seconds = left.get("seconds")
    if isinstance(seconds, str):
        parts.append(seconds)
    elif seconds is not None:
        parts.append(human_seconds(seconds))
    if left.get("bytes") is not None:
        parts.append(human_bytes(left["bytes"]))
    if left.get("packets") is not None:
        parts.append(f"{left['packets']} packets")
    return ", ".join(parts) if parts else "unlimited"


def human_seconds(s: Any) -> str:
    s = max(0, int(float(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def human_bytes(n: Any) -> str:
    n = int(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)  # pragma: no cover


def _policy_line(pol: Mapping[str, Any], i: int) -> str:
    name = pol.get("name", pol.get("index", i))
    sel = pol.get("selector")
    sel_text = selector_text(sel) if isinstance(sel, Mapping) else (sel or "-")
    action = _get(pol, "action")
    if pol.get("mode"):
        ends = f"{pol.get('tunnel_src')}-{pol.get('tunnel_dst')}" if pol.get("tunnel_src") else ""
        action += f" esp/{pol['mode']}/{ends}/{pol.get('level', '')}".rstrip("/")
    extra = ""
    if pol.get("spi") is not None:
        extra += f"  spi {_spi(pol['spi'])}"
    if pol.get("reqid") is not None:
        extra += f"  reqid {pol['reqid']}"
    return f"{str(name):<10} {_get(pol, 'direction'):<3} {sel_text}  {action}{extra}  hits {_get(pol, 'hits')}"


def selector_text(sel: Mapping[str, Any]) -> str:
    """A selector dict (``local``/``remote`` from the SPD, or ``src``/``dst``) as one phrase."""
    def end(addr_key: str, alt: str, port_key: str) -> str:
        text = str(sel.get(addr_key, sel.get(alt, "any")))
        port = sel.get(port_key)
        return text if port in (None, "any") else f"{text}[{port}]"

    text = f"{end('local', 'src', 'local_port')} <-> {end('remote', 'dst', 'remote_port')} {sel.get('proto', 'any')}"
    for key in ("sport", "dport", "icmp", "icmp_type", "icmp_code", "mh_type"):
        if sel.get(key) not in (None, "any"):
            text += f" {key.replace('_', '-')} {sel[key]}"
    return text


def _processor_lines(proc: Mapping[str, Any], indent: str) -> list[str]:
    if "workers" in proc:
        lines = [f"{indent}supervisor pid {_get(proc, 'pid')}"]
        for name, worker in (proc.get("workers") or {}).items():
            if worker:
                lines.append(f"{indent}{name} worker:")
                lines.extend(_processor_lines(worker, indent + "  "))
        return lines
    head = (f"{indent}pid {_get(proc, 'pid')}  role {_get(proc, 'role')}  "
            f"up {_get(proc, 'uptime', human_seconds)}  reloads {_get(proc, 'reloads')}  "
            f"trace {_get(proc, 'trace_level')}")
    lines = [head]
    for q, c in sorted((proc.get("queues") or {}).items(), key=lambda kv: int(kv[0])):
        lines.append(f"{indent}queue {q} ({c.get('direction', '-')}): accepted {c.get('accepted', 0)}  "
                     f"modified {c.get('modified', 0)}  dropped {c.get('dropped', 0)}  errors {c.get('errors', 0)}")
    return lines


def render_query(result: Any) -> str:
    """A query answer (``query_outbound`` / ``query_inbound_spi``) as ``key: value`` lines."""
    if not isinstance(result, Mapping):
        return json.dumps(result) + "\n"
    lines = []
    for key, value in result.items():
        if isinstance(value, (Mapping, list)):
            value = json.dumps(value, sort_keys=True)
        elif key == "spi":
            value = _spi(value)
        lines.append(f"{key}: {value}")
    return "\n".join(lines) + "\n"


# -- trace ---------------------------------------------------------------------------------------


def format_event(record: Mapping[str, Any], colour: bool = False) -> str:
    """One trace record as one line, e.g.

    ``12:00:01.123456 out encap    spi 0x00001000 seq 7  10.0.0.1 > 10.0.0.2 via 192.0.2.1 > 192.0.2.2  len 140  q 0``
    """
    ev = TraceEvent.from_record(record)
    when = _clock_text(ev.time)
    name = ev.event or "?"
    parts = [when, f"{ev.direction or '-':<3}", _paint(f"{name:<8}", EVENT_COLOURS.get(name), colour)]
    if ev.reason:
        parts.append(_paint(ev.reason, "red", colour))
    if ev.spi is not None:
        parts.append(f"spi {_spi(ev.spi)}")
    if ev.seq is not None:
        parts.append(f"seq {ev.seq}")
    if ev.inner_src or ev.inner_dst:
        parts.append(f" {ev.inner_src or '?'} > {ev.inner_dst or '?'}")
    if ev.outer_src or ev.outer_dst:
        parts.append(f"via {ev.outer_src or '?'} > {ev.outer_dst or '?'}")
    if ev.length is not None:
        parts.append(f" len {ev.length}")
    if ev.queue is not None:
        parts.append(f"q {ev.queue}")
    if ev.component and ev.component not in ("bits", "esp", "spd"):
        parts.append(f"[{ev.component}]")
    if ev.detail:
        parts.append(f"({ev.detail})")
    return " ".join(parts).rstrip()


def _clock_text(t: Any) -> str:
    if not isinstance(t, (int, float)):
        return "-"
    return datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")


class EventFilter:
    """``--spi``, ``--event`` (comma list), ``--addr`` (an address or a prefix; any of the four)."""

    def __init__(self, spi: int | str | None = None, event: str | Sequence[str] | None = None,
                 addr: str | None = None) -> None:
        self.spi = int(spi, 0) if isinstance(spi, str) else spi
        if isinstance(event, str):
            event = [e.strip() for e in event.split(",") if e.strip()]
        self.events = frozenset(event) if event else None
        self.net = ipaddress.ip_network(addr, strict=False) if addr else None

    def __call__(self, record: Mapping[str, Any]) -> bool:
        if self.spi is not None and record.get("spi") != self.spi:
            return False
        if self.events is not None and record.get("event") not in self.events:
            return False
        if self.net is not None:
            return any(self._in_net(record.get(k)) for k in ("inner_src", "inner_dst", "outer_src", "outer_dst"))
        return True

    def _in_net(self, text: Any) -> bool:
        if not text:
            return False
        try:
            return ipaddress.ip_address(text) in self.net  # type: ignore[operator]
        except ValueError:
            return False


def trace_tail(
    path: str,
    *,
    follow: bool = False,
    lines: int = 20,
    spi: int | str | None = None,
    event: str | Sequence[str] | None = None,
    addr: str | None = None,
    as_json: bool = False,
    keep: int = DEFAULT_KEEP,
    out: IO[str] | None = None,
    colour: bool | None = None,
    interval: float = 0.25,
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """``mipbits trace tail``: the last ``lines`` matching events, then (``follow``) new ones.

    Follows rotation. Returns the number of events printed. ``stop`` ends following (tests).
    """
    out = out or sys.stdout
    colour = use_colour(out) if colour is None else colour
    keep_filter = EventFilter(spi, event, addr)
    emit = (lambda r: json.dumps(r, separators=(",", ":"))) if as_json else (lambda r: format_event(r, colour))
    follower = TraceFollower(path, from_start=True)  # backlog and following share one open file
    try:
        backlog: deque[Mapping[str, Any]] = deque(maxlen=max(lines, 0))
        for record in (*_rotated_records(path, keep), *follower.poll()):
            if lines > 0 and keep_filter(record):
                backlog.append(record)
        printed = _print(backlog, emit, out)
        while follow and not stop():
            batch = [r for r in follower.poll() if keep_filter(r)]
            printed += _print(batch, emit, out)
            if not batch:
                time.sleep(interval)
        return printed
    finally:
        follower.close()


def _rotated_records(path: str, keep: int) -> Iterable[Mapping[str, Any]]:
    """Records of ``path.KEEP`` .. ``path.1`` (oldest first), not of ``path`` itself."""
    for n in range(keep, 0, -1):
        yield from read_all(rotated_name(path, n), keep=0)


def _print(records: Iterable[Mapping[str, Any]], emit: Callable[[Mapping[str, Any]], str], out: IO[str]) -> int:
    n = 0
    for record in records:
        out.write(emit(record) + "\n")
        n += 1
    if n:
        out.flush()
    return n
