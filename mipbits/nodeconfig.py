"""NODE.toml: one node's configuration (the CLI is the only reader of config files).

::

    [node]
    name = "a"                     # letters, digits, "-", "_"
    role = "ipsec"                 # "ipsec" | "mn" | "ha"

    [ipsec]
    sa_file = "a.setkey"           # SAs and policies in setkey syntax (relative to this file)
    state_dir = "/var/lib/mipbits/a"   # sequence-number persistence

    [queues]
    outbound = 0                   # a queue number, or a contiguous list (--queue-balance)
    inbound = 1
    workers = 1                    # 1: one process; 2: one outbound + one inbound process
    maxlen = 4096                  # kernel queue length per queue (optional)

    [trace]
    path = "/var/log/mipbits/a.jsonl"
    level = "drops"                # "off" | "drops" | "all"
    max_bytes = 10485760           # rotate above this size
    keep = 3                       # rotated files kept

    [control]
    socket = "/run/mipbits/a.sock"

    [rules]                        # optional
    ipv4 = true
    ipv6 = true
    interfaces = []                # empty: every interface but loopback
    nd_bypass = true               # never queue IPv6 Neighbour Discovery
    tcp_mss = 1340                 # MSS clamp on outgoing SYN/SYN-ACK (room for ESP); 0 = off

Unknown keys in these sections are errors (typos must not be silently ignored); other top-level
sections (e.g. the mobility ones of ``mn``/``ha`` nodes) are kept raw in ``NodeConfig.sections``.
Relative paths are relative to the file's directory. Every error is a ``ConfigError`` naming the
file and the key, e.g. ``a.toml: [queues] workers: must be 1 or 2, got 3``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bits.errors import ConfigError
from bits.io.iptables import DEFAULT_TCP_MSS, RuleSettings
from bits.io.nfqueue import DEFAULT_MAXLEN, QueueSettings
from bits.io.tracefile import DEFAULT_KEEP, DEFAULT_MAX_BYTES, MIN_MAX_BYTES, TraceSettings
from bits.trace import TraceLevel

ROLES = ("ipsec", "mn", "ha")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
_KNOWN = {
    "node": {"name", "role"},
    "ipsec": {"sa_file", "state_dir"},
    "queues": {"outbound", "inbound", "workers", "maxlen"},
    "trace": {"path", "level", "max_bytes", "keep"},
    "control": {"socket"},
    "rules": {"ipv4", "ipv6", "interfaces", "nd_bypass", "tcp_mss"},
}


@dataclass(frozen=True, slots=True)
class NodeConfig:
    path: str  # the NODE.toml it came from
    name: str
    role: str
    sa_file: str | None
    state_dir: str
    queues: QueueSettings
    trace: TraceSettings
    control_socket: str
    rules: RuleSettings
    sections: Mapping[str, Any] = field(default_factory=dict)  # other top-level tables, raw


class _Reader:
    """Typed access to one file's tables; every failure names the file and ``[section] key``."""

    def __init__(self, path: Path, data: Mapping[str, Any]) -> None:
        self.path = path
        self.data = data

    def fail(self, section: str, key: str | None, problem: str) -> ConfigError:
        where = f"[{section}] {key}" if key else f"[{section}]"
        return ConfigError(f"{where}: {problem}", path=str(self.path))

    def table(self, section: str, required: bool = False) -> Mapping[str, Any]:
        value = self.data.get(section)
        if value is None:
            if required:
                raise self.fail(section, None, "missing section")
            return {}
        if not isinstance(value, dict):
            raise self.fail(section, None, "must be a table")
        unknown = sorted(set(value) - _KNOWN[section])
        if unknown:
            raise self.fail(section, unknown[0], f"unknown key (known: {', '.join(sorted(_KNOWN[section]))})")
        return value

    def get(
        self, section: str, key: str, kind: type | tuple[type, ...], default: Any = ..., required: bool = False
    ) -> Any:
        table = self.table(section)
        if key not in table:
            if required or default is ...:
                raise self.fail(section, key, "missing")
            return default
        value = table[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(section, key, f"must be {_kind_name(kind)}, got {value!r}")
        return value

    def file_path(self, section: str, key: str, default: str | None) -> str | None:
        value = self.get(section, key, str, default)
        if value is None:
            return None
        if not value.strip():
            raise self.fail(section, key, "must not be empty")
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (self.path.parent / p).resolve())


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {int: "an integer", str: "a string", bool: "true or false", list: "a list"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def load_node_config(path: str | Path) -> NodeConfig:
    """Read and check NODE.toml; ConfigError (naming file and key) on any problem."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=str(p)) from None
    try:
        data = tomllib.loads(raw.decode())
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", path=str(p)) from None
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(f"TOML syntax: {exc}", path=str(p), line=int(m.group(1)) if m else None) from None
    return parse_node_config(data, p)


def parse_node_config(data: Mapping[str, Any], path: Path) -> NodeConfig:
    r = _Reader(path, data)
    r.table("node", required=True)
    name = r.get("node", "name", str, required=True)
    if not _NAME.match(name):
        raise r.fail("node", "name", f"{name!r}: use 1-32 letters, digits, '-' or '_'")
    role = r.get("node", "role", str, "ipsec")
    if role not in ROLES:
        raise r.fail("node", "role", f"must be one of {', '.join(ROLES)}, got {role!r}")
    return NodeConfig(
        path=str(path),
        name=name,
        role=role,
        sa_file=r.file_path("ipsec", "sa_file", None),
        state_dir=r.file_path("ipsec", "state_dir", f"/var/lib/mipbits/{name}") or "",
        queues=_queues(r),
        trace=_trace(r),
        control_socket=r.file_path("control", "socket", f"/run/mipbits/{name}.sock") or "",
        rules=_rules(r),
        sections={k: v for k, v in data.items() if k not in _KNOWN},
    )


def _queue_list(r: _Reader, key: str, default: int) -> tuple[int, ...]:
    value = r.get("queues", key, (int, list), default)
    items = value if isinstance(value, list) else [value]
    if not items:
        raise r.fail("queues", key, "needs at least one queue number")
    for q in items:
        if not isinstance(q, int) or isinstance(q, bool) or not 0 <= q <= 65535:
            raise r.fail("queues", key, f"queue numbers are integers 0..65535, got {q!r}")
    qs = sorted(set(items))
    if qs != list(range(qs[0], qs[-1] + 1)):
        raise r.fail("queues", key, f"{qs} is not a contiguous range (iptables --queue-balance needs one)")
    return tuple(qs)


def _queues(r: _Reader) -> QueueSettings:
    outbound = _queue_list(r, "outbound", 0)
    inbound = _queue_list(r, "inbound", 1)
    if set(outbound) & set(inbound):
        raise r.fail("queues", "inbound", f"shares queue(s) {sorted(set(outbound) & set(inbound))} with outbound")
    workers = r.get("queues", "workers", int, 1)
    if workers not in (1, 2):
        raise r.fail("queues", "workers", f"must be 1 or 2, got {workers}")
    maxlen = r.get("queues", "maxlen", int, DEFAULT_MAXLEN)
    if not 1 <= maxlen <= 1 << 20:
        raise r.fail("queues", "maxlen", f"must be 1..{1 << 20}, got {maxlen}")
    return QueueSettings(outbound, inbound, workers, maxlen)


def _trace(r: _Reader) -> TraceSettings:
    path = r.file_path("trace", "path", None)
    level_text = r.get("trace", "level", str, "drops" if path else "off")
    try:
        level = TraceLevel.parse(level_text)
    except ConfigError:
        raise r.fail("trace", "level", f"must be off, drops or all, got {level_text!r}") from None
    if level != TraceLevel.OFF and path is None:
        raise r.fail("trace", "path", f"needed for level {level}")
    max_bytes = r.get("trace", "max_bytes", int, DEFAULT_MAX_BYTES)
    if max_bytes < MIN_MAX_BYTES:
        raise r.fail("trace", "max_bytes", f"must be at least {MIN_MAX_BYTES}, got {max_bytes}")
    keep = r.get("trace", "keep", int, DEFAULT_KEEP)
    if not 0 <= keep <= 100:
        raise r.fail("trace", "keep", f"must be 0..100, got {keep}")
    return TraceSettings(path, level, max_bytes, keep)


def _rules(r: _Reader) -> RuleSettings:
    ipv4 = r.get("rules", "ipv4", bool, True)
    ipv6 = r.get("rules", "ipv6", bool, True)
    if not (ipv4 or ipv6):
        raise r.fail("rules", "ipv6", "ipv4 and ipv6 cannot both be false")
    interfaces = r.get("rules", "interfaces", list, [])
    for name in interfaces:
        if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9_.:@+-]{1,15}$", name) or name == "lo":
            raise r.fail("rules", "interfaces", f"bad interface name {name!r}")
    nd_bypass = r.get("rules", "nd_bypass", bool, True)
    tcp_mss = r.get("rules", "tcp_mss", int, DEFAULT_TCP_MSS)
    if tcp_mss and not 536 <= tcp_mss <= 65495:
        raise r.fail("rules", "tcp_mss", f"must be 0 (off) or 536..65495, got {tcp_mss}")
    return RuleSettings(ipv4, ipv6, tuple(interfaces), nd_bypass, tcp_mss)
