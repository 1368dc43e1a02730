"""``mipbits run`` for a mobile node or a home agent: the engine in a child process, the mobility
module (``mobility.node``) and the tunnel interface (``mobility.tunnel`` + ``mobility.io``) in this
one. Part of the composition root: it reads the ``[mn]`` / ``[ha]`` sections of NODE.toml and wires
everything together (docs/testbed.md).

Start-up (each step undone on the way out, in reverse, also after an error)::

    engine rules (rules_install)  ->  hook rules (HookRules, first in their chains)
    -> fork: the child runs the engine processor (run_processor) and dies with us
    -> wait until the engine's control socket answers
    -> TUN device, routes, MH socket, inbound hook, netlink (MN), control socket "<socket>.mobility"
    -> the loop: one selector over the TUN, the hook queue, the MH socket, netlink, the control
       socket and a signal pipe; timers from the Binding Cache / Binding Update List

SIGTERM / SIGINT: clean shutdown. SIGHUP: passed on to the engine (it reloads its SAs) and the
tunnel module forgets what it learnt about SPIs. If the engine child exits, the node stops (fail
closed) with status 1.

``[mn]`` keys::

    hoa = "2001:db8:1::100"          # required: the home address
    home_agent = "2001:db8:1::1"     # required: the home agent (on the home prefix)
    home_prefix = "2001:db8:1::/64"  # required
    interfaces = ["home", "v1"]      # required: the links to watch, in order of preference
    lifetime = 600                   # requested binding lifetime, seconds (4..262140)
    first_reg_timeout = 1.5          # InitialBindackTimeoutFirstReg (RFC 6275 13)
    # DSMIPv6 (RFC 5555; docs/dsmipv6.md): with home_agent_ipv4 the MN also watches IPv4-only
    # links and registers an IPv4 care-of address there (BU in UDP to the HA's port 4191)
    home_agent_ipv4 = "198.51.100.2" # the HA's IPv4 address
    ipv4_hoa = "0.0.0.0"             # ask for an IPv4 home address (0.0.0.0: any; an address:
                                     #   that one, configured on the TUN from the start)
    force_udp = false                # the F flag: data in UDP even without a NAT
    nat_keepalive = 110              # NATKATIMEOUT when the HA's NAT Detection option says 0
    udp_port = 0                     # the MN's UDP source port (0: the kernel picks one)

``[ha]`` keys::

    address = "2001:db8:1::1"        # required: the home agent address
    home_prefix = "2001:db8:1::/64"  # required
    home_interface = "home"          # required: the home link
    mobile_nodes = ["2001:db8:1::100"]   # served HoAs (empty: any HoA on the prefix; then a
                                     #   mobile node at home is only protected after a binding)
    max_lifetime = 3600              # the HA's cap on a binding, seconds
    max_bindings = 1024
    table = 202                      # routing table of packets forwarded to served HoAs (into the TUN)
    # DSMIPv6 (RFC 5555): UDP 4191 and protocol 41 on the HA's IPv4 address
    ipv4_address = "198.51.100.2"    # the HA's IPv4 address
    ipv4_pool = ["198.18.1.200"]     # dynamic IPv4 home addresses
    ipv4_static = { "2001:db8:1::100" = "198.18.1.100" }   # static ones (served at home too)
    nat_refresh_time = 110           # NATKATIMEOUT sent in the NAT Detection option, seconds
    accept_force_udp = true          # honour the F flag (else BA status 144)
    force_udp = false                # UDP encapsulation for every IPv4 CoA

An IPv4 home address travels as IPv4 inside the IPv6 tunnel SA: the engine's result is of the
other IP version, which NFQUEUE cannot carry, so the engine runs wrapped in
``bits.io.crossfamily.CrossFamilyEngine`` (raw-socket emission, ``[rules]`` emitted mark).

Both: ``mode = "api" | "heuristic"`` (``--mode`` wins), ``tun = "mip6tnl"``, ``hook_queue = 7``,
``path_mtu = 1500``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import os
import re
import selectors
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bits.constants import AuthAlg, EncAlg, Mode
from bits.engine import Engine
from bits.errors import BitsError, ConfigError
from bits.io.control import ControlError, ControlServer, RequestError, control_request
from bits.io.crossfamily import CrossFamilyEmitter, CrossFamilyEngine
from bits.io.iptables import rules_install, rules_remove
from bits.io.nfqueue import run_processor
from bits.io.tracefile import TraceSettings, open_trace_writer
from bits.setkey import load_setkey
from bits.trace import TraceLevel, make_record
from mipbits.nodeconfig import NodeConfig
from mobility.binding import BindingCache, HomeAgentConfig
from mobility.bul import BindingUpdateList, MobileNodeConfig
from mobility.errors import MobilityError
from mobility.errors import ParseError as MhParseError
from mobility.io.classify import control_queries
from mobility.io.homelink import DEFAULT_HOME_TABLE, HaHomeLink, MnHomeLink, send_na
from mobility.io.hook import DEFAULT_QUEUE, HookRules, InboundHook
from mobility.io.mhsock import MhSocket, PacketSender
from mobility.io.netlink import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_LINK,
    NetlinkMonitor,
    NetState,
    dump,
    locate,
)
from mobility.io.routes import SEND_MARK, HaRoutes, MnRoutes
from mobility.io.tun import DEFAULT_NAME as DEFAULT_TUN
from mobility.io.tun import TunDevice, pump
from mobility.io.udp4191 import (
    Counters,
    IpipSocket,
    RawIpv4Sender,
    RouteSender,
    UdpTunnelSocket,
    control_inbound_seq,
    service_ipip,
    service_udp,
)
from mobility.mh import MobilityMessage
from mobility.node import HomeAgent, Location, MobileNode
from mobility.tunnel import (
    BindingTable,
    EspShape,
    HaTunnel,
    MnTunnel,
    MtuPlan,
    TunnelTrace,
    esp_shape,
    make_classifier,
    tunnel_mtus,
)
from mobility.udp4191 import DSMIPV6_PORT, DSMIPV6_RESERVE

LOG = logging.getLogger("mipbits.mobility")

MODES = ("api", "heuristic")
RTMGRP_IPV6_ROUTE = 0x400  # route changes wake movement detection too (the gateway may come late)
RTMGRP_IPV4_ROUTE = 0x40
EXPIRE_RECORDS_EVERY = 1.0  # seconds: the HA forgets outer records no authenticated BU claimed
IPV6_FREEBIND = 78  # linux/in6.h: bind the HoA before it is configured anywhere
ENGINE_START_TIMEOUT = 30.0
ENGINE_STOP_TIMEOUT = 10.0
MAX_WAIT = 1.0  # seconds the loop sleeps at most
GATEWAY_RETRY = 0.1  # seconds between looks for the visited link's default router
GATEWAY_PATIENCE = 3.0  # then the link is taken as on-link
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@+-]{1,15}$")
_LARGEST_SHAPE = esp_shape(EncAlg.AES_CBC, AuthAlg.HMAC_SHA256_128)


class MobilityRunError(BitsError):
    """The mobility node cannot start or had to stop (printed by the command line)."""


# --- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MnSettings:
    hoa: ipaddress.IPv6Address
    ha: ipaddress.IPv6Address
    home_prefix: ipaddress.IPv6Network
    interfaces: tuple[str, ...]
    lifetime: float
    first_reg_timeout: float
    mode: str
    tun: str
    hook_queue: int
    path_mtu: int
    ha_ipv4: ipaddress.IPv4Address | None = None  # DSMIPv6 when set
    ipv4_hoa: ipaddress.IPv4Address | None = None  # None: none asked for; 0.0.0.0: any
    force_udp: bool = False
    nat_keepalive: float = 110.0
    udp_port: int = 0

    role = "mn"

    @property
    def address(self) -> ipaddress.IPv6Address:
        return self.hoa

    @property
    def dsmipv6(self) -> bool:
        return self.ha_ipv4 is not None

    @property
    def ipv4_home(self) -> bool:
        """IPv4 home address traffic (IPv4 inside the IPv6 tunnel SA) on this node?"""
        return self.ipv4_hoa is not None


@dataclass(frozen=True, slots=True)
class HaSettings:
    address: ipaddress.IPv6Address
    home_prefix: ipaddress.IPv6Network
    home_interface: str
    mobile_nodes: tuple[ipaddress.IPv6Address, ...]
    max_lifetime: float
    max_bindings: int
    table: int
    mode: str
    tun: str
    hook_queue: int
    path_mtu: int
    ipv4_address: ipaddress.IPv4Address | None = None  # DSMIPv6 when set
    ipv4_pool: tuple[ipaddress.IPv4Address, ...] = ()
    ipv4_static: tuple[tuple[ipaddress.IPv6Address, ipaddress.IPv4Address], ...] = ()
    nat_refresh_time: int = 110
    accept_force_udp: bool = True
    force_udp: bool = False

    role = "ha"

    @property
    def dsmipv6(self) -> bool:
        return self.ipv4_address is not None

    @property
    def ipv4_home(self) -> bool:
        return bool(self.ipv4_pool or self.ipv4_static)


_COMMON = {"mode", "tun", "hook_queue", "path_mtu"}
_KEYS = {
    "mn": _COMMON | {"hoa", "home_agent", "home_prefix", "interfaces", "lifetime", "first_reg_timeout",
                     "home_agent_ipv4", "ipv4_hoa", "force_udp", "nat_keepalive", "udp_port"},
    "ha": _COMMON | {"address", "home_prefix", "home_interface", "mobile_nodes", "max_lifetime",
                     "max_bindings", "table", "ipv4_address", "ipv4_pool", "ipv4_static", "nat_refresh_time",
                     "accept_force_udp", "force_udp"},
}


class _Section:
    """Typed access to ``[mn]`` / ``[ha]``; every error names the file, the section and the key."""

    def __init__(self, cfg: NodeConfig, name: str) -> None:
        self.cfg = cfg
        self.name = name
        raw = cfg.sections.get(name)
        if raw is None:
            raise self.fail(None, f"missing section (a node with role {cfg.role!r} needs it)")
        if not isinstance(raw, dict):
            raise self.fail(None, "must be a table")
        unknown = sorted(set(raw) - _KEYS[name])
        if unknown:
            raise self.fail(unknown[0], f"unknown key (known: {', '.join(sorted(_KEYS[name]))})")
        self.raw: Mapping[str, Any] = raw

    def fail(self, key: str | None, problem: str) -> ConfigError:
        where = f"[{self.name}] {key}" if key else f"[{self.name}]"
        return ConfigError(f"{where}: {problem}", path=self.cfg.path)

    def value(self, key: str, kinds: tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.raw:
            if default is ...:
                raise self.fail(key, "missing")
            return default
        value = self.raw[key]
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            names = {str: "a string", int: "an integer", float: "a number", list: "a list", bool: "true or false"}
            raise self.fail(key, f"must be {' or '.join(names.get(k, k.__name__) for k in kinds)}, got {value!r}")
        return value

    def address(self, key: str) -> ipaddress.IPv6Address:
        text = self.value(key, (str,))
        try:
            addr = ipaddress.IPv6Address(text)
        except ValueError:
            raise self.fail(key, f"not an IPv6 address: {text!r}") from None
        if addr.is_multicast or addr.is_unspecified or addr.is_loopback or addr.is_link_local:
            raise self.fail(key, f"{addr} is not a unicast routable address")
        return addr

    def address4(self, key: str, text: Any = ..., unspecified: bool = False) -> ipaddress.IPv4Address:
        """An IPv4 unicast address (``unspecified``: 0.0.0.0 allowed too)."""
        if text is ...:
            text = self.value(key, (str,))
        try:
            addr = ipaddress.IPv4Address(text)
        except (ValueError, TypeError):
            raise self.fail(key, f"not an IPv4 address: {text!r}") from None
        if addr.is_unspecified and unspecified:
            return addr
        if addr.is_multicast or addr.is_unspecified or addr.is_loopback or addr.is_reserved or addr.is_link_local \
                or addr == ipaddress.IPv4Address("255.255.255.255"):
            raise self.fail(key, f"{addr} is not a unicast address")
        return addr

    def prefix(self, key: str) -> ipaddress.IPv6Network:
        text = self.value(key, (str,))
        try:
            return ipaddress.IPv6Network(text)
        except ValueError as exc:
            raise self.fail(key, f"not an IPv6 prefix: {exc}") from None

    def number(self, key: str, default: float, low: float, high: float, integer: bool = False) -> Any:
        value = self.value(key, (int,) if integer else (int, float), default)
        if not low <= value <= high:
            raise self.fail(key, f"must be {low}..{high}, got {value}")
        return value

    def ifname(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not _IFNAME.match(value) or value == "lo":
            raise self.fail(key, f"bad interface name {value!r}")
        return value

    def on_prefix(self, key: str, addr: ipaddress.IPv6Address, prefix: ipaddress.IPv6Network) -> None:
        if addr not in prefix:
            raise self.fail(key, f"{addr} is not on the home prefix {prefix}")

    def common(self, cli_mode: str | None) -> dict[str, Any]:
        mode = cli_mode or self.value("mode", (str,), "api")
        if mode not in MODES:
            raise self.fail("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
        queue = self.number("hook_queue", DEFAULT_QUEUE, 0, 65535, integer=True)
        if queue in (*self.cfg.queues.outbound, *self.cfg.queues.inbound):
            raise self.fail("hook_queue", f"queue {queue} is the engine's ([queues])")
        return {
            "mode": mode,
            "tun": self.ifname("tun", self.value("tun", (str,), DEFAULT_TUN)),
            "hook_queue": queue,
            "path_mtu": self.number("path_mtu", 1500, 1280, 65535, integer=True),
        }


def mobility_settings(cfg: NodeConfig, cli_mode: str | None = None) -> MnSettings | HaSettings:
    """The ``[mn]`` or ``[ha]`` section of a node with role mn / ha, checked (ConfigError)."""
    if cfg.role not in ("mn", "ha"):
        raise ConfigError(f"[node] role: {cfg.role!r} has no mobility module", path=cfg.path)
    sect = _Section(cfg, cfg.role)
    common = sect.common(cli_mode)
    prefix = sect.prefix("home_prefix")
    if cfg.role == "mn":
        return _mn_settings(sect, prefix, common)
    return _ha_settings(sect, prefix, common)


def _mn_settings(sect: _Section, prefix: ipaddress.IPv6Network, common: dict[str, Any]) -> MnSettings:
    hoa, ha = sect.address("hoa"), sect.address("home_agent")
    sect.on_prefix("hoa", hoa, prefix)
    sect.on_prefix("home_agent", ha, prefix)
    if hoa == ha:
        raise sect.fail("home_agent", "the home agent cannot have the home address")
    names = sect.value("interfaces", (list,))
    if not names:
        raise sect.fail("interfaces", "needs at least one interface")
    interfaces = tuple(sect.ifname("interfaces", n) for n in names)
    if common["tun"] in interfaces:
        raise sect.fail("interfaces", f"{common['tun']} is the tunnel device")
    return MnSettings(
        hoa=hoa, ha=ha, home_prefix=prefix, interfaces=interfaces,
        lifetime=sect.number("lifetime", 600, 4, 262140),
        first_reg_timeout=sect.number("first_reg_timeout", 1.5, 0.1, 60),
        **common, **_mn_dsmipv6(sect),
    )


def _mn_dsmipv6(sect: _Section) -> dict[str, Any]:
    """The DSMIPv6 keys of ``[mn]`` (RFC 5555); none of them without ``home_agent_ipv4``."""
    raw = sect.raw
    if "home_agent_ipv4" not in raw:
        extra = sorted({"ipv4_hoa", "force_udp", "nat_keepalive", "udp_port"} & set(raw))
        if extra:
            raise sect.fail(extra[0], "needs home_agent_ipv4 (DSMIPv6)")
        return {}
    ipv4_hoa = sect.address4("ipv4_hoa", unspecified=True) if "ipv4_hoa" in raw else None
    return {
        "ha_ipv4": sect.address4("home_agent_ipv4"),
        "ipv4_hoa": ipv4_hoa,
        "force_udp": sect.value("force_udp", (bool,), False),
        "nat_keepalive": sect.number("nat_keepalive", 110, 1, 65535),
        "udp_port": sect.number("udp_port", 0, 0, 65535, integer=True),
    }


def _ha_settings(sect: _Section, prefix: ipaddress.IPv6Network, common: dict[str, Any]) -> HaSettings:
    address = sect.address("address")
    sect.on_prefix("address", address, prefix)
    nodes = []
    for text in sect.value("mobile_nodes", (list,), []):
        try:
            hoa = ipaddress.IPv6Address(text)
        except (ValueError, TypeError):
            raise sect.fail("mobile_nodes", f"not an IPv6 address: {text!r}") from None
        sect.on_prefix("mobile_nodes", hoa, prefix)
        nodes.append(hoa)
    return HaSettings(
        address=address, home_prefix=prefix,
        home_interface=sect.ifname("home_interface", sect.value("home_interface", (str,))),
        mobile_nodes=tuple(nodes),
        max_lifetime=sect.number("max_lifetime", 3600, 4, 262140),
        max_bindings=sect.number("max_bindings", 1024, 1, 1 << 20, integer=True),
        table=sect.number("table", DEFAULT_HOME_TABLE, 1, 252, integer=True),
        **common, **_ha_dsmipv6(sect, prefix),
    )


def _ha_dsmipv6(sect: _Section, prefix: ipaddress.IPv6Network) -> dict[str, Any]:
    """The DSMIPv6 keys of ``[ha]`` (RFC 5555); none of them without ``ipv4_address``."""
    raw = sect.raw
    keys = {"ipv4_pool", "ipv4_static", "nat_refresh_time", "accept_force_udp", "force_udp"}
    if "ipv4_address" not in raw:
        extra = sorted(keys & set(raw))
        if extra:
            raise sect.fail(extra[0], "needs ipv4_address (DSMIPv6)")
        return {}
    pool = tuple(sect.address4("ipv4_pool", a) for a in sect.value("ipv4_pool", (list,), []))
    static = []
    for hoa_text, addr in dict(sect.value("ipv4_static", (dict,), {})).items():
        try:
            hoa = ipaddress.IPv6Address(hoa_text)
        except ValueError:
            raise sect.fail("ipv4_static", f"not an IPv6 home address: {hoa_text!r}") from None
        sect.on_prefix("ipv4_static", hoa, prefix)
        static.append((hoa, sect.address4("ipv4_static", addr)))
    taken = [a for _, a in static] + list(pool)
    if len(set(taken)) != len(taken):
        raise sect.fail("ipv4_pool", "an IPv4 home address is listed twice (pool and static)")
    return {
        "ipv4_address": sect.address4("ipv4_address"),
        "ipv4_pool": pool,
        "ipv4_static": tuple(static),
        "nat_refresh_time": sect.number("nat_refresh_time", 110, 1, 65534, integer=True),
        "accept_force_udp": sect.value("accept_force_udp", (bool,), True),
        "force_udp": sect.value("force_udp", (bool,), False),
    }


def mtu_plan(cfg: NodeConfig, settings: MnSettings | HaSettings) -> MtuPlan:
    """The tunnel's MTUs for the payload SA(s) of the setkey file: the tunnel-mode SAs between
    the HoA and the HA (MN) or with the HA as an end (HA); the largest overhead wins."""
    shapes = _payload_shapes(cfg, settings)
    if not shapes:
        LOG.warning("no tunnel-mode SA for %s in %s: sizing the tunnel for AES-CBC + HMAC-SHA-256",
                    settings.address, cfg.sa_file)
        shapes = [_LARGEST_SHAPE]
    reserve = {"reserve": DSMIPV6_RESERVE} if settings.dsmipv6 else {}  # IPv4 + UDP: 28 octets, not 24
    plans = [tunnel_mtus(settings.path_mtu, s, **reserve) for s in shapes]
    plan = min(plans, key=lambda p: p.inner_mtu)
    if plan.inner_mtu < 1280:
        raise ConfigError(f"[{settings.role}] path_mtu: {settings.path_mtu} leaves {plan.inner_mtu} octets "
                          "inside the tunnel, less than IPv6's 1280", path=cfg.path)
    return plan


def _payload_shapes(cfg: NodeConfig, settings: MnSettings | HaSettings) -> list[EspShape]:
    if cfg.sa_file is None:
        raise ConfigError("[ipsec] sa_file: a mobility node needs its SAs", path=cfg.path)
    local = settings.address
    ipsec = load_setkey(cfg.sa_file, local_addresses=[local])
    shapes = []
    for sa in ipsec.sas:
        ends = {sa.src, sa.dst}
        if sa.mode is not Mode.TUNNEL or local not in ends:
            continue
        if isinstance(settings, MnSettings) and ends != {settings.hoa, settings.ha}:
            continue
        shapes.append(esp_shape(sa.enc, sa.auth))
    return shapes


# --- the trace ---------------------------------------------------------------------------------------------


class MobilityTrace:
    """Mobility records in the node's trace file (the same JSON Lines as the engine's, component
    ``mobility``; the engine child writes to the same file). Control-plane decisions are written at
    level ``drops`` and up; the tunnel module's classification of every packet only at ``all``
    (at ``drops``: signalling -- BUs/BAs with the outer path chosen or recorded, the record a BU
    was given (commit) --, Home Address options, Packet Too Big and drops; per-packet data, plain
    and decapsulation records only at ``all``)."""

    def __init__(self, settings: TraceSettings) -> None:
        self.writer = open_trace_writer(settings)
        self.all = settings.level >= TraceLevel.ALL

    @property
    def on(self) -> bool:
        return self.writer is not None

    def control(self, event: str, fields: Mapping[str, Any]) -> None:
        if self.writer is not None:
            self.writer.write(make_record(event, "mobility", None, fields))

    def tunnel(self, t: TunnelTrace) -> None:
        if self.writer is None or not (self.all or t.drop is not None or t.kind.value not in ("data", "plain", "decap")):
            return
        d = t.to_dict()
        fields = {"direction": d["direction"], "reason": d["drop"], "spi": t.spi, "mode": d["mode"],
                  "kind": d["kind"], "why": d["reason"], "hoa": d["hoa"], "coa": d["coa"]}
        detail = f"{d['kind']} {d['mode']} {d['reason'] or ''} coa {d['coa'] or '-'}"
        if t.outer is not None:  # DSMIPv6: the IPv4 path chosen, or the outer address recorded/seen
            fields["outer"] = t.outer
            detail += f" outer {t.outer}"
        fields["detail"] = detail.replace("  ", " ")
        self.writer.write(make_record("drop" if t.drop is not None else "tunnel", "mobility", None, fields))

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# --- the engine child ------------------------------------------------------------------------------------


EngineFactory = Callable[..., Engine]


def _die_with_parent() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGTERM): the engine must not outlive the mobility module."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)


def cross_family(cfg: NodeConfig, engine_factory: EngineFactory) -> EngineFactory:
    """The engine factory with every engine wrapped in ``CrossFamilyEngine``: its IPv4-in-IPv6
    results (the IPv4 home address in the IPv6 tunnel SA) leave through raw sockets marked with
    ``[rules]``'s emitted mark, on which the engine's rules RETURN (bits/io/crossfamily.py)."""
    mark = cfg.rules.emitted_mark
    if not mark:
        raise ConfigError("an IPv4 home address needs the engine rules' emitted mark (it is 0)", path=cfg.path)

    def factory(*args: Any, **kwargs: Any) -> Any:
        return CrossFamilyEngine(engine_factory(*args, **kwargs), CrossFamilyEmitter(mark))

    return factory


class EngineChild:
    """The engine processor (``run_processor``) in a forked child that dies with us."""

    def __init__(self, cfg: NodeConfig, engine_factory: EngineFactory) -> None:
        self.cfg = cfg
        self.engine_factory = engine_factory
        self.pid: int | None = None
        self.status: int | None = None

    def start(self) -> None:
        parent = os.getpid()
        pid = os.fork()
        if pid:
            self.pid = pid
            return
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            _die_with_parent()
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)
            code = run_processor(self.cfg, self.engine_factory)
        except BaseException as exc:  # noqa: BLE001 - report and leave the child, never unwind the parent's stack
            LOG.error("engine: %s", exc, exc_info=not isinstance(exc, BitsError))
        finally:
            logging.shutdown()
            os._exit(code)

    def exited(self) -> bool:
        """True once the child is gone (reaped here)."""
        if self.pid is None or self.status is not None:
            return True
        try:
            done, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            done, status = self.pid, 0
        if done:
            self.status = os.waitstatus_to_exitcode(status)
        return self.status is not None

    def wait_ready(self, stopping: Callable[[], bool], timeout: float = ENGINE_START_TIMEOUT) -> bool:
        """Until the engine's control socket answers; False when asked to stop meanwhile."""
        deadline = time.monotonic() + timeout
        while not stopping():
            if self.exited():
                raise MobilityRunError(f"the engine exited during start-up (status {self.status})")
            with contextlib.suppress(ControlError, OSError):
                control_request(self.cfg.control_socket, "ping", timeout=1.0)
                return True
            if time.monotonic() > deadline:
                raise MobilityRunError(f"the engine did not answer on {self.cfg.control_socket} in {timeout:.0f} s")
            time.sleep(0.05)
        return False

    def signal(self, sig: int) -> None:
        if not self.exited():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)  # type: ignore[arg-type]

    def stop(self, timeout: float = ENGINE_STOP_TIMEOUT) -> None:
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while not self.exited():
            if time.monotonic() > deadline:
                LOG.error("engine (pid %s) did not stop in time; killing it", self.pid)
                self.signal(signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.02)


# --- the node ---------------------------------------------------------------------------------------------


def _safe(fn: Callable[[], Any], what: str) -> Callable[[], None]:
    """A clean-up step that logs instead of raising: one failure must not stop the others."""

    def run() -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            LOG.warning("clean-up (%s) failed: %s", what, exc)

    return run


def _mh_socket(address: ipaddress.IPv6Address, freebind: bool) -> MhSocket:
    """The MH socket bound to ``address``; the MN's HoA may not be configured yet (IPV6_FREEBIND)."""
    mh = MhSocket(None)
    try:
        if freebind:
            mh.sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        mh.sock.bind((str(address), 0))
    except OSError:
        mh.close()
        raise
    mh.address = address
    return mh


class NodeRuntime:
    """One mobility node: set-up, the loop, clean-up."""

    def __init__(self, cfg: NodeConfig, settings: MnSettings | HaSettings, plan: MtuPlan,
                 engine_factory: EngineFactory) -> None:
        self.cfg = cfg
        self.settings = settings
        self.plan = plan
        if settings.ipv4_home:
            engine_factory = cross_family(cfg, engine_factory)
        self.engine = EngineChild(cfg, engine_factory)
        self.stopping = False
        self.reload = False
        self.started = time.monotonic()
        self.trace = MobilityTrace(cfg.trace)
        self.sel = selectors.DefaultSelector()
        self.mh_errors = 0
        self.send_errors: dict[str, int] = {}
        self.node: MobileNode | HomeAgent | None = None
        self.tunnel: MnTunnel | HaTunnel | None = None
        self.hook: InboundHook | None = None
        self.sender: PacketSender | None = None
        self.route_sender: RouteSender | None = None  # IPv6 via ``sender``, IPv4 paths via the sockets
        self.tun: TunDevice | None = None
        self.mh: MhSocket | None = None
        self.classifier: Any = None
        # DSMIPv6 (RFC 5555): UDP 4191 and protocol 41
        self.udp: UdpTunnelSocket | None = None
        self.ipip: IpipSocket | None = None
        self.ipv4_in = Counters()
        self.expire_at = 0.0
        # mobile node only
        self.netlink: NetlinkMonitor | None = None
        self.net = NetState()
        self.routes_mn: MnRoutes | None = None
        self.pending: Location | None = None  # a location whose gateway has not shown up yet
        self.pending_since = 0.0
        self.relocate_at: float | None = None

    # --- life cycle ---

    def run(self) -> int:
        with contextlib.ExitStack() as stack:
            self._signals(stack)
            stack.callback(_safe(self.trace.close, "trace"))
            self.trace.control("start", {"detail": f"{self.settings.role} pid {os.getpid()} mode {self.settings.mode}"})
            rules_install(self.cfg)
            stack.callback(_safe(lambda: rules_remove(self.cfg), "engine rules"))
            hook_rules = HookRules(self.settings.hook_queue)
            hook_rules.install()  # after the engine's: ours go first
            stack.callback(_safe(hook_rules.remove, "hook rules"))
            self.engine.start()
            stack.callback(_safe(self.engine.stop, "engine"))
            if not self.engine.wait_ready(lambda: self.stopping):
                return 0
            self._build(stack)
            LOG.info("%s ready (engine pid %s, mode %s, inner MTU %d)", self.settings.role, self.engine.pid,
                     self.settings.mode, self.plan.inner_mtu)
            code = self._loop()
            self.trace.control("stop", {"detail": f"pid {os.getpid()} status {code}"})
            return code
        return 1  # unreachable (mypy)

    def _signals(self, stack: contextlib.ExitStack) -> None:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        stack.callback(wake_r.close)
        stack.callback(wake_w.close)
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)}

        def stop(*_: object) -> None:
            self.stopping = True

        def hup(*_: object) -> None:
            self.reload = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the loop
        old_wake = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)

        def restore() -> None:
            signal.set_wakeup_fd(old_wake)
            for sig, handler in old.items():
                signal.signal(sig, handler)

        stack.callback(restore)
        self.sel.register(wake_r, selectors.EVENT_READ, lambda: _drain(wake_r))

    def _build(self, stack: contextlib.ExitStack) -> None:
        s = self.settings
        self.tun = TunDevice(s.tun, mtu=self.plan.device_mtu)
        stack.callback(_safe(self.tun.close, "TUN"))
        # heuristic mode never calls these (a test runs it with the control socket unreachable)
        classifier = self.classifier = make_classifier(s.mode, s.role, *control_queries(self.cfg.control_socket))
        self.sender = PacketSender()
        stack.callback(_safe(self.sender.close, "raw sockets"))
        if s.dsmipv6:
            self._build_ipv4_sockets(stack, s)
        local4 = RawIpv4Sender() if s.ipv4_home else None
        if local4 is not None:
            stack.callback(_safe(local4.close, "raw IPv4 socket"))
        self.route_sender = RouteSender(self.sender.send, self.udp, self.ipip, local4)
        if isinstance(s, MnSettings):
            self._build_mn(stack, s, classifier)
        else:
            self._build_ha(stack, s, classifier)
        assert self.tunnel is not None and self.mh is not None
        stack.callback(_safe(self.mh.close, "MH socket"))
        self.hook = InboundHook(self.tunnel, s.hook_queue)
        self.hook.bind()
        stack.callback(_safe(self.hook.close, "hook"))
        control = ControlServer(self.cfg.control_socket + ".mobility", self._control)
        stack.callback(_safe(control.close, "control socket"))
        self._watch(self.tun.fileno(), self._on_tun)
        self._watch(self.hook.fileno(), self.hook.service)
        self._watch(self.mh.fileno(), self._on_mh)
        self._watch(control.fileno(), lambda: control.service(0))
        if self.udp is not None and self.ipip is not None:
            self._watch(self.udp.fileno(), self._on_udp)
            self._watch(self.ipip.fileno(), self._on_ipip)

    def _build_ipv4_sockets(self, stack: contextlib.ExitStack, s: MnSettings | HaSettings) -> None:
        """UDP (HA: its IPv4 address, port 4191; MN: one port for every IPv4 CoA) and protocol 41.
        Marked SEND_MARK (the tunnel's) and the engine rules' emitted mark: what they send is the
        engine's ESP already, and the engine's IPv4 rules RETURN on that mark."""
        mark = SEND_MARK | self.cfg.rules.emitted_mark
        if isinstance(s, HaSettings):
            self.udp = UdpTunnelSocket(str(s.ipv4_address), DSMIPV6_PORT, mark=mark)
        else:
            self.udp = UdpTunnelSocket("0.0.0.0", s.udp_port, mark=mark)
        stack.callback(_safe(self.udp.close, "UDP socket"))
        bind = str(s.ipv4_address) if isinstance(s, HaSettings) else None
        self.ipip = IpipSocket(bind, mark=mark)
        stack.callback(_safe(self.ipip.close, "protocol-41 socket"))

    def _build_mn(self, stack: contextlib.ExitStack, s: MnSettings, classifier: Any) -> None:
        assert self.tun is not None
        self.tunnel = MnTunnel(s.hoa, s.ha, classifier, path_mtu=s.path_mtu, tracing=self.trace.on, ha_ipv4=s.ha_ipv4)
        routes = MnRoutes(self.tun.name)
        stack.callback(_safe(routes.cleanup, "routes"))
        routes.setup()
        self.routes_mn = routes
        home_link = MnHomeLink()
        stack.callback(_safe(home_link.cleanup, "home route"))
        self.mh = _mh_socket(s.hoa, freebind=True)
        bul = BindingUpdateList(
            MobileNodeConfig(hoa=s.hoa, ha=s.ha, lifetime=s.lifetime, home_prefix=s.home_prefix,
                             first_reg_timeout=s.first_reg_timeout, ha_ipv4=s.ha_ipv4, ipv4_hoa=s.ipv4_hoa,
                             force_udp=s.force_udp, nat_keepalive=s.nat_keepalive),
            rand=os.urandom,
        )
        self.node = MobileNode(bul, self.tunnel, routes, home_link, self._send, inner_mtu=self.plan.inner_mtu,
                               trace=self.trace.control)
        if s.ipv4_hoa is not None and not s.ipv4_hoa.is_unspecified:
            self.node.start_ipv4_home(s.ipv4_hoa)  # ours by configuration, like the HoA
        groups = RTMGRP_LINK | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
        if s.dsmipv6:  # IPv4-only links are visited networks too (RFC 5555 4.4.1)
            groups |= RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE
        self.netlink = NetlinkMonitor(groups)  # before the dump
        stack.callback(_safe(self.netlink.close, "netlink"))
        self.net.apply(dump(ipv4=s.dsmipv6))
        self._watch(self.netlink.fileno(), self._on_netlink)
        self._relocate(time.monotonic())

    def _build_ha(self, stack: contextlib.ExitStack, s: HaSettings, classifier: Any) -> None:
        assert self.tun is not None
        table = BindingTable()
        # api mode: the record of the BU the engine authenticated is found by its sequence number
        inbound_seq = control_inbound_seq(self.cfg.control_socket) if s.mode == "api" and s.dsmipv6 else None
        self.tunnel = HaTunnel(s.address, table, classifier, path_mtu=s.path_mtu,
                               inner_mtu=self.plan.inner_mtu, tracing=self.trace.on, inbound_seq=inbound_seq)
        # proxy NAs not looped back to ourselves (send_unsolicited_na's would teach the HA's own
        # neighbour table that the HoA is at the HA's address)
        routes = HaRoutes(self.tun.name, s.home_interface, announce=lambda iface, hoa: send_na(iface, hoa))
        stack.callback(_safe(routes.cleanup, "routes"))
        routes.setup()
        if s.ipv4_home:
            routes.setup_ipv4()
        home_link = HaHomeLink(self.tun.name, s.home_interface, table=s.table, inner_mtu=self.plan.inner_mtu)
        stack.callback(_safe(home_link.cleanup, "home routes"))
        home_link.setup()
        cache = BindingCache(HomeAgentConfig(
            home_prefixes=(s.home_prefix,), mobile_nodes=frozenset(s.mobile_nodes) or None,
            max_lifetime=s.max_lifetime, max_bindings=s.max_bindings, ipv4_pool=s.ipv4_pool,
            ipv4_static=dict(s.ipv4_static), nat_refresh_time=s.nat_refresh_time,
            accept_force_udp=s.accept_force_udp, force_udp=s.force_udp))
        self.mh = _mh_socket(s.address, freebind=False)
        self.node = HomeAgent(cache, table, self.tunnel, routes, home_link, self._send, address=s.address,
                              mobile_nodes=s.mobile_nodes, trace=self.trace.control, ipv4_static=dict(s.ipv4_static))
        self.node.start()

    def _watch(self, fd: int, action: Callable[[], None]) -> None:
        self.sel.register(fd, selectors.EVENT_READ, action)

    # --- the loop ---

    def _loop(self) -> int:
        node = self.node
        assert node is not None
        while not self.stopping:
            now = time.monotonic()
            for key, _ in self.sel.select(self._timeout(node, now)):
                self._dispatch(key.data)
            now = time.monotonic()
            if self.stopping:  # Ctrl-C reaches the engine too: its exit is then no failure
                break
            if self.engine.exited():
                LOG.error("the engine (pid %s) exited with status %s; stopping", self.engine.pid, self.engine.status)
                self.trace.control("error", {"detail": f"engine exited (status {self.engine.status})"})
                return 1
            if self.reload:
                self._reload()
            self._timers(node, now)
            self._drain_traces()
        return 0

    def _dispatch(self, action: Callable[[], None]) -> None:
        try:
            action()
        except (MobilityError, OSError) as exc:  # a failed route command, a send error: log, go on
            LOG.error("%s", exc)
            self.trace.control("error", {"detail": str(exc)})

    def _timeout(self, node: MobileNode | HomeAgent, now: float) -> float:
        deadlines = [t for t in (node.next_timer(), self.relocate_at) if t is not None]
        return max(0.0, min([MAX_WAIT, *(t - now for t in deadlines)]))

    def _timers(self, node: MobileNode | HomeAgent, now: float) -> None:
        if self.relocate_at is not None and now >= self.relocate_at:
            self.relocate_at = None
            self._dispatch(lambda: self._relocate(now))
        deadline = node.next_timer()
        if deadline is not None and now >= deadline:
            self._dispatch(lambda: node.handle_timer(now))
        if isinstance(self.tunnel, HaTunnel) and now >= self.expire_at:
            self.expire_at = now + EXPIRE_RECORDS_EVERY
            self.tunnel.expire_records(now)  # garbage never claimed by an authenticated BU

    def _drain_traces(self) -> None:
        if self.tunnel is not None and self.tunnel.events:
            for t in self.tunnel.drain_events():
                self.trace.tunnel(t)
        self.trace.flush()

    def _reload(self) -> None:
        """SIGHUP: the engine reloads its SAs; what the tunnel module learnt about SPIs is stale."""
        self.reload = False
        self.engine.signal(signal.SIGHUP)
        if self.tunnel is not None:
            self.tunnel.sad_changed()
        self.trace.control("reload", {"detail": "SIGHUP passed to the engine; SPI knowledge dropped"})

    # --- handlers ---

    def _on_tun(self) -> None:
        assert self.tun is not None and self.tunnel is not None and self.route_sender is not None
        pump(self.tun, self.tunnel, self.route_sender.send, time.monotonic())  # type: ignore[arg-type]

    def _on_udp(self) -> None:
        """UDP 4191: the IPv6 packet inside goes into the TUN, below the engine (HA: Req #4
        records the outer address and port first)."""
        assert self.udp is not None and self.tun is not None
        service_udp(self.udp, self.tunnel, self.tun.write, time.monotonic(), self.ipv4_in)  # type: ignore[arg-type]

    def _on_ipip(self) -> None:
        assert self.ipip is not None and self.tun is not None
        service_ipip(self.ipip, self.tunnel, self.tun.write, time.monotonic(), self.ipv4_in)  # type: ignore[arg-type]

    def _on_mh(self) -> None:
        assert self.mh is not None and self.node is not None
        while True:
            try:
                got = self.mh.recv()
            except MhParseError as exc:  # RFC 6275 9.2: discarded
                self.mh_errors += 1
                self.trace.control("mh-error", {"detail": str(exc)})
                continue
            if got is None:
                return
            self.node.received(got.message, got.src, got.dst, time.monotonic())

    def _send(self, message: MobilityMessage, dst: ipaddress.IPv6Address, src: ipaddress.IPv6Address) -> None:
        assert self.mh is not None
        try:
            self.mh.send(message, dst, src)
        except OSError as exc:  # no route right now (detached): the BUL retransmits
            name = type(exc).__name__ if exc.errno is None else os.strerror(exc.errno)
            self.send_errors[name] = self.send_errors.get(name, 0) + 1
            self.trace.control("error", {"detail": f"{type(message).__name__} to {dst}: {name}"})

    def _on_netlink(self) -> None:
        assert self.netlink is not None
        try:
            self.net.apply(self.netlink.read())
        except OSError as exc:  # ENOBUFS: events were lost; start again from a dump
            LOG.warning("netlink: %s; dumping again", exc)
            self.net = NetState()
            self.net.apply(dump(ipv4=self.settings.dsmipv6))
        self._relocate(time.monotonic())

    def _relocate(self, now: float) -> None:
        """Movement detection: where are we now, and (away) which router takes our packets?"""
        s, node, routes = self.settings, self.node, self.routes_mn
        assert isinstance(s, MnSettings) and isinstance(node, MobileNode) and routes is not None
        where = locate(self.net, s.interfaces, s.home_prefix)
        loc = Location(where.kind, where.interface, where.coa, ipv4_coa=where.ipv4_coa)
        current = node.location
        if (loc.kind, loc.interface, loc.coa) == (current.kind, current.interface, current.coa):
            self.pending = None
            return
        family = 4 if loc.coa is not None and loc.coa.version == 4 else 6  # IPv4-only: the DHCP router
        gateway = routes.default_gateway(loc.interface, family) if loc.interface else None
        if loc.kind == "away" and gateway is None:
            if self.pending != loc:
                self.pending, self.pending_since = loc, now
            if now - self.pending_since < GATEWAY_PATIENCE:
                self.relocate_at = now + GATEWAY_RETRY  # the router's route may still be on its way
                return
        self.pending = None
        node.moved(Location(loc.kind, loc.interface, loc.coa, gateway, loc.ipv4_coa), now)

    # --- control socket ---

    def _control(self, request: Mapping[str, Any]) -> Any:
        cmd = request["cmd"]
        if cmd == "ping":
            return {"pid": os.getpid()}
        if cmd == "status":
            return self.status()
        raise RequestError(f"unknown cmd {cmd!r} (status, ping)")

    def status(self) -> dict[str, Any]:
        node, now = self.node, time.monotonic()
        assert node is not None
        st = node.status(now)
        st.update(
            mode=self.settings.mode,
            pid=os.getpid(),
            engine_pid=self.engine.pid,
            uptime=round(now - self.started, 3),
            monotonic=now,
            time=time.time(),
            mtu={"path": self.plan.path_mtu, "device": self.plan.device_mtu, "inner": self.plan.inner_mtu},
            hook=dict(self.hook.counts) if self.hook else {},
            sender={"sent": {r.value: n for r, n in self.sender.sent.items()}, "errors": dict(self.sender.errors)}
            if self.sender else {},
            mh_errors=self.mh_errors,
            send_errors=dict(self.send_errors),
            queries=getattr(self.classifier, "queries", None),  # engine queries (api); None: heuristic
        )
        if self.settings.dsmipv6 and self.route_sender is not None:
            s = self.settings
            st["dsmipv6"] = {
                "ha_ipv4": str(s.ha_ipv4 if isinstance(s, MnSettings) else s.ipv4_address),
                "udp_port": self.udp.port if self.udp is not None else None,
                "sent": dict(self.route_sender.sent),
                "send_errors": dict(self.route_sender.errors),
                "received": dict(self.ipv4_in.counts),
            }
        return st


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.recv(4096)


def run_mobility_node(cfg: NodeConfig, mode: str | None, engine_factory: EngineFactory) -> int:
    """``mipbits run`` for role mn / ha; returns the exit status (0: stopped by a signal)."""
    settings = mobility_settings(cfg, mode)
    plan = mtu_plan(cfg, settings)
    try:
        return NodeRuntime(cfg, settings, plan, engine_factory).run()
    except (MobilityError, OSError) as exc:
        raise MobilityRunError(f"{cfg.path}: {exc}") from None


# --- mipbits status ----------------------------------------------------------------------------------------


def render_mobility_status(d: Mapping[str, Any]) -> str:
    """The mobility part of ``mipbits status`` (the ``status`` answer of ``<socket>.mobility``)."""
    if "error" in d and "role" not in d:
        return f"\nmobility: not available ({d['error']})\n"
    head = f"\nmobility ({d.get('role', '?')}, {d.get('mode', '?')} mode, pid {d.get('pid', '-')})"
    lines = [head]
    if d.get("role") == "mn":
        lines += _mn_lines(d)
    elif d.get("role") == "ha":
        lines += _ha_lines(d)
    lines += _tunnel_lines(d)
    return "\n".join(lines) + "\n"


def _mn_lines(d: Mapping[str, Any]) -> list[str]:
    loc = d.get("location") or {}
    where = {"home": f"at home on {loc.get('interface')}",
             "away": f"away on {loc.get('interface')}, CoA {loc.get('coa')} via {loc.get('gateway') or 'on-link'}",
             }.get(loc.get("kind"), "detached")
    bul = d.get("bul") or {}
    lines = [f"  HoA {d.get('hoa')}  HA {d.get('ha')}", f"  location  {where}",
             f"  BUL       {bul.get('state', '-')}, next seq {bul.get('next_seq', '-')}"]
    binding = bul.get("binding")
    if binding:
        lines.append(f"  binding   CoA {binding['coa']}, lifetime {binding['lifetime']} s, expires in "
                     f"{binding['expires_in']:.0f} s, refresh in {binding['refresh_in']:.0f} s")
        if ":" not in binding["coa"]:  # an IPv4 CoA (DSMIPv6)
            how = ("NAT detected, data in UDP" if binding.get("nat_detected") else
                   "data in UDP (F)" if binding.get("udp_encap") else "no NAT, data IPv6-in-IPv4")
            keep = f", keepalive every {binding['keepalive']:.0f} s" if binding.get("keepalive") else ""
            lines.append(f"  DSMIPv6   {how}{keep}")
    if d.get("ipv4_hoa"):
        lines.append(f"  IPv4 HoA  {d['ipv4_hoa']} (on the tunnel)")
    if bul.get("outstanding"):
        lines.append(f"  waiting   for the BA to seq {bul['outstanding']['seq']}")
    history = d.get("history") or []
    if history:
        lines.append("  registrations (latest last):")
        for h in history[-8:]:
            nat = "" if h.get("nat_detected") is None or ":" in h["coa"] else (
                " NAT" if h["nat_detected"] else " no NAT")
            lines.append(f"    {h['kind']:<10} CoA {h['coa']:<28} seq {h['seq']:<5} status {h['status']:<3} "
                         f"BU->BA {h['bu_to_ba'] * 1000:.1f} ms ({h['bus']} BU){nat}")
    return lines


def _ha_lines(d: Mapping[str, Any]) -> list[str]:
    bindings = d.get("bindings") or []
    lines = [f"  address {d.get('address')}", f"  binding cache ({len(bindings)}):"]
    for b in bindings:
        lines.append(f"    {b['hoa']} -> {b['coa']}  seq {b['seq']}  {b['state']}  lifetime {b['lifetime']} s, "
                     f"{b['remaining']:.0f} s left")
        if b.get("udp_source"):
            how = ("NAT detected, data in UDP" if b.get("nat_detected") else
                   "data in UDP (F)" if b.get("udp_encap") else "no NAT, data IPv6-in-IPv4")
            lines.append(f"      outer {b['udp_source']}: {how}")
        if b.get("ipv4_hoa"):
            lines.append(f"      IPv4 HoA {b['ipv4_hoa']}")
    lines.append(f"  at home: {', '.join(d.get('at_home') or []) or '-'}")
    statuses = d.get("ba_status") or {}
    if statuses:
        lines.append("  BAs sent: " + ", ".join(f"status {k} x{v}" for k, v in statuses.items()))
    return lines


def _tunnel_lines(d: Mapping[str, Any]) -> list[str]:
    t = d.get("tunnel") or {}
    counts = ", ".join(f"{k} {v}" for k, v in (t.get("counts") or {}).items() if v) or "-"
    lines = [f"  tunnel    {t.get('state', '')} {counts}".replace("    ", "  ", 1)]
    drops = t.get("drops") or {}
    if drops:
        lines.append("  drops     " + ", ".join(f"{k} {v}" for k, v in drops.items()))
    hook = d.get("hook") or {}
    if hook:
        lines.append("  hook      " + ", ".join(f"{k} {v}" for k, v in hook.items()))
    ds = d.get("dsmipv6")
    if ds:
        sent = ", ".join(f"{k} {v}" for k, v in (ds.get("sent") or {}).items() if v) or "-"
        lines.append(f"  DSMIPv6   HA {ds.get('ha_ipv4')}, UDP port {ds.get('udp_port')}; sent {sent}; "
                     f"in {', '.join(f'{k} {v}' for k, v in (ds.get('received') or {}).items())}")
    mtu = d.get("mtu")
    if mtu:
        lines.append(f"  MTU       path {mtu['path']}, TUN {mtu['device']}, inside the tunnel {mtu['inner']}")
    return lines


__all__ = [
    "HaSettings",
    "MnSettings",
    "MobilityRunError",
    "MobilityTrace",
    "mobility_settings",
    "mtu_plan",
    "render_mobility_status",
    "run_mobility_node",
]
