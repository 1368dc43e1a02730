"""Routes, addresses, proxy Neighbor Discovery and policy routing for the tunnel (control plane).

Everything goes through ``ip`` / ``sysctl`` subprocess calls (never per packet), and every change
is recorded with the command that undoes it, in named groups: ``revert(group)`` undoes one group,
``cleanup()`` undoes everything in reverse order and restores sysctls to their previous values.

Home agent (RFC 6275 10.4.1):

* ``setup()``: ``net.ipv6.conf.all.forwarding=1`` and ``proxy_ndp=1`` on the home link;
* ``bind(hoa)`` while a binding exists: ``HoA/128 dev TUN`` (packets for the HoA reach the tunnel
  module), ``ip -6 neigh add proxy HoA dev HOME`` (the HA answers Neighbor Solicitations for it)
  and an unsolicited Neighbor Advertisement so neighbours forget the MN's old link-layer address;
* ``unbind(hoa)``: both removed.

Mobile node, while away (RFC 6275 11.2, 11.5.2):

* ``setup()``: ``ip -6 rule add fwmark SEND_MARK lookup TABLE``: packets the tunnel module sends
  (SO_MARK) leave via the visited link, not back into the TUN;
* ``away(...)``: the HoA on the TUN (``nodad``: no DAD on the HoA while bound), ``HA/128 dev TUN``
  (the engine's ESP packets reach the tunnel module), ``default dev TUN metric 1 mtu INNER`` (the
  host's traffic goes to the engine with the inner MTU), and in TABLE ``default via GATEWAY dev
  VISITED`` (where the marked packets go);
* ``away_ipv4(...)`` (DSMIPv6, RFC 5555: an IPv4-only visited link): the same routes through the
  TUN, and TABLE holds ``unreachable default``: the IPv6 packets the tunnel module still sends with
  an old IPv6 CoA (Req #3, until the BA) have no IPv6 path here and fail at once, instead of
  looping back into the TUN. What goes to the HA travels in UDP/IPv4 by the main IPv4 table;
* ``ipv4_home(addr, inner_mtu)``: the IPv4 home address the HA assigned, on the TUN, with a
  source rule ``from ADDR lookup TABLE4`` (TABLE4: ``default dev TUN mtu INNER``): what the host
  sends from it reaches the engine, which puts it into the IPv6 tunnel SA. Kept at home too: the
  tunnel SA runs HoA <-> HA there as well;
* ``home()``: the away routes removed.

Home agent, DSMIPv6: ``setup_ipv4()`` (``net.ipv4.ip_forward=1``: IPv4 traffic for IPv4 home
addresses is forwarded into the TUN).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import struct
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from ..binding import BindingCreated, BindingDeleted
from ..errors import MobilityError

LOG = logging.getLogger("mipbits.routes")

#: Packets the tunnel module sends to the wire: the engine's rules skip them and, on the MN,
#: policy routing sends them out of the visited link.
SEND_MARK = 0x00100000
#: Packets the inbound hook has already seen (it re-queues them with NF_REPEAT).
HOOK_MARK = 0x00200000
DEFAULT_TABLE = 201
DEFAULT_IPV4_TABLE = 203  # the MN's IPv4 home address: "default dev TUN" (202: the HA's home table)
DEFAULT_RULE_PREF = 1000  # before the main table's rule (32766)
TUN_METRIC = 1  # the MN's default route via the TUN wins over RA-learnt ones (1024)

class Runner(Protocol):
    def __call__(self, argv: Sequence[str], stdin: str | None = None) -> str: ...


class RoutesError(MobilityError):
    """An ``ip`` / ``sysctl`` command failed; carries the command and its stderr."""


def command_runner(netns: str | None = None, timeout: float = 10.0) -> Runner:
    """Run a command (optionally in ``ip netns exec NETNS``), return stdout, raise RoutesError."""
    prefix = ["ip", "netns", "exec", netns] if netns else []

    def run(argv: Sequence[str], stdin: str | None = None) -> str:
        cmd = [*prefix, *argv]
        try:
            done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RoutesError(f"{' '.join(cmd)}: {exc}") from None
        if done.returncode != 0:
            raise RoutesError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    return run


class NetConfig:
    """Changes with their undo commands, in named groups."""

    def __init__(self, runner: Runner | None = None) -> None:
        self.run = runner or command_runner()
        self._groups: dict[str, list[list[str]]] = {}  # group -> undo commands, in order done

    def change(self, group: str, do: Sequence[str], undo: Sequence[str]) -> None:
        """Run ``do``; on success remember ``undo`` under ``group``."""
        self.run(do)
        self._groups.setdefault(group, []).append(list(undo))

    def sysctl(self, group: str, key: str, value: str) -> None:
        """Set ``key`` unless it already has ``value``; the undo restores the old value."""
        old = self.run(["sysctl", "-n", key]).strip()
        if old != value:
            self.change(group, ["sysctl", "-qw", f"{key}={value}"], ["sysctl", "-qw", f"{key}={old}"])

    def has(self, group: str) -> bool:
        return group in self._groups

    def revert(self, group: str) -> list[str]:
        """Undo ``group`` (last change first). Failures are logged and returned, not raised: a
        route already gone (link removed) must not stop the rest of the clean-up."""
        failures = []
        for undo in reversed(self._groups.pop(group, [])):
            try:
                self.run(undo)
            except RoutesError as exc:
                LOG.warning("undo failed: %s", exc)
                failures.append(str(exc))
        return failures

    def cleanup(self) -> list[str]:
        """Undo every group, newest first."""
        failures = []
        for group in reversed(list(self._groups)):
            failures += self.revert(group)
        return failures

    def groups(self) -> list[str]:
        return list(self._groups)


# --- home agent -----------------------------------------------------------------------------------------------


class HaRoutes(NetConfig):
    """Routes and proxy ND of a home agent (RFC 6275 10.4.1)."""

    def __init__(self, tun: str, home_if: str, runner: Runner | None = None,
                 announce: Callable[[str, str], None] | None = None) -> None:
        super().__init__(runner)
        self.tun = tun
        self.home_if = home_if
        self.announce = announce  # (iface, hoa) -> send an unsolicited NA; None: skip
        self.announce_errors = 0

    def setup(self) -> None:
        self.sysctl("setup", "net.ipv6.conf.all.forwarding", "1")
        self.sysctl("setup", f"net.ipv6.conf.{self.home_if}.proxy_ndp", "1")

    def setup_ipv4(self) -> None:
        """DSMIPv6 with IPv4 home addresses: the HA forwards IPv4 to them (into the TUN)."""
        self.sysctl("setup-ipv4", "net.ipv4.ip_forward", "1")

    def bind(self, hoa: str | ipaddress.IPv6Address) -> None:
        """Intercept ``hoa``: route it into the TUN and answer Neighbor Solicitations for it.
        Idempotent: a binding moving to another CoA changes nothing here."""
        group = f"hoa {hoa}"
        if self.has(group):
            return
        self.change(group, ["ip", "-6", "route", "replace", f"{hoa}/128", "dev", self.tun],
                    ["ip", "-6", "route", "del", f"{hoa}/128", "dev", self.tun])
        self.change(group, ["ip", "-6", "neigh", "replace", "proxy", str(hoa), "dev", self.home_if],
                    ["ip", "-6", "neigh", "del", "proxy", str(hoa), "dev", self.home_if])
        if self.announce is not None:
            try:
                self.announce(self.home_if, str(hoa))
            except OSError as exc:  # best effort (RFC 6275 10.4.1 SHOULD): proxy ND still answers
                LOG.warning("unsolicited NA for %s on %s failed: %s", hoa, self.home_if, exc)
                self.announce_errors += 1

    def unbind(self, hoa: str | ipaddress.IPv6Address) -> None:
        self.revert(f"hoa {hoa}")

    def apply(self, events: Sequence[object]) -> None:
        """``BindingCreated`` -> bind, ``BindingDeleted`` -> unbind (call before sending the BA of
        a de-registration, so that BA is not routed into the tunnel)."""
        for ev in events:
            if isinstance(ev, BindingCreated):
                self.bind(ev.hoa)
            elif isinstance(ev, BindingDeleted):
                self.unbind(ev.hoa)


# --- mobile node --------------------------------------------------------------------------------------------------


class MnRoutes(NetConfig):
    """Routes of a mobile node away from home (RFC 6275 11.2)."""

    def __init__(self, tun: str, runner: Runner | None = None, *, table: int = DEFAULT_TABLE,
                 pref: int = DEFAULT_RULE_PREF, mark: int = SEND_MARK, ipv4_table: int = DEFAULT_IPV4_TABLE) -> None:
        super().__init__(runner)
        self.tun = tun
        self.table = str(table)
        self.pref = str(pref)
        self.mark = f"{mark:#x}/{mark:#x}"
        self.ipv4_table = str(ipv4_table)
        self.ipv4_hoa: str | None = None

    def setup(self) -> None:
        """The policy rule for marked packets (kept while the daemon runs, home or away)."""
        rule = ["pref", self.pref, "fwmark", self.mark, "lookup", self.table]
        self.change("setup", ["ip", "-6", "rule", "add", *rule], ["ip", "-6", "rule", "del", *rule])

    def away(self, hoa: str, ha: str, iface: str, gateway: str | None, inner_mtu: int) -> None:
        """Away on ``iface`` (next hop ``gateway``, None: on-link). Moving again only replaces
        the route of the marked packets."""
        self._away(hoa, ha, inner_mtu)
        self.revert("link")
        via = ["via", gateway] if gateway else []
        route = ["default", *via, "dev", iface, "table", self.table]
        self.change("link", ["ip", "-6", "route", "replace", *route], ["ip", "-6", "route", "del", *route])

    def away_ipv4(self, hoa: str, ha: str, inner_mtu: int) -> None:
        """Away on an IPv4-only link (DSMIPv6): the TUN routes as in ``away``; marked IPv6
        packets (an old IPv6 CoA's data until the BA) have no route: ``unreachable default``."""
        self._away(hoa, ha, inner_mtu)
        self.revert("link")
        route = ["unreachable", "default", "table", self.table]
        self.change("link", ["ip", "-6", "route", "replace", *route], ["ip", "-6", "route", "del", *route])

    def ipv4_home(self, addr: str, inner_mtu: int) -> None:
        """The IPv4 home address (RFC 5555 4.5) on the TUN with its source route; a new one
        replaces the old. Idempotent."""
        if self.ipv4_hoa == addr:
            return
        self.revert("hoa4")
        rule = ["pref", self.pref, "from", f"{addr}/32", "lookup", self.ipv4_table]
        route = ["default", "dev", self.tun, "table", self.ipv4_table]
        self.change("hoa4", ["ip", "-4", "addr", "add", f"{addr}/32", "dev", self.tun],
                    ["ip", "-4", "addr", "del", f"{addr}/32", "dev", self.tun])
        self.change("hoa4", ["ip", "-4", "route", "replace", *route, "mtu", str(inner_mtu)],
                    ["ip", "-4", "route", "del", *route])
        self.change("hoa4", ["ip", "-4", "rule", "add", *rule], ["ip", "-4", "rule", "del", *rule])
        self.ipv4_hoa = addr

    def _away(self, hoa: str, ha: str, inner_mtu: int) -> None:
        if not self.has("away"):
            self.change("away", ["ip", "-6", "addr", "add", f"{hoa}/128", "dev", self.tun, "nodad"],
                        ["ip", "-6", "addr", "del", f"{hoa}/128", "dev", self.tun])
            self.change("away", ["ip", "-6", "route", "replace", f"{ha}/128", "dev", self.tun],
                        ["ip", "-6", "route", "del", f"{ha}/128", "dev", self.tun])
            default = ["default", "dev", self.tun, "metric", str(TUN_METRIC)]
            self.change("away", ["ip", "-6", "route", "replace", *default, "mtu", str(inner_mtu)],
                        ["ip", "-6", "route", "del", *default])

    def home(self) -> None:
        self.revert("link")
        self.revert("away")

    def cleanup(self) -> list[str]:
        self.ipv4_hoa = None
        return super().cleanup()

    def default_gateway(self, iface: str, family: int = 6) -> str | None:
        """The next hop of the main table's IPv6 (``family`` 4: IPv4) default route on ``iface``
        (learnt from RAs / DHCP)."""
        out = self.run(["ip", f"-{family}", "-j", "route", "show", "default", "dev", iface])
        try:
            routes = json.loads(out or "[]")
        except ValueError:
            return None
        return next((r["gateway"] for r in routes if r.get("gateway")), None)


# --- unsolicited Neighbor Advertisement (RFC 4861 7.2.6, RFC 6275 10.4.1) -----------------------------------------------

_NA = struct.Struct("!BBHI16s")  # Type 136, Code, Checksum, R|S|O flags, Target Address
_NA_ROUTER, _NA_OVERRIDE = 0x80000000, 0x20000000
_TLLA = 2  # Target Link-Layer Address option


def push_unsolicited_na(target: str, mac: bytes, router: bool = True) -> bytes:
    """ICMPv6 NA for ``target`` with O = 1, S = 0 and our link-layer address (checksum 0: the
    kernel fills it for ICMPv6 raw sockets)."""
    flags = _NA_OVERRIDE | (_NA_ROUTER if router else 0)
    body = _NA.pack(136, 0, 0, flags, ipaddress.IPv6Address(target).packed)
    return body + bytes([_TLLA, 1]) + mac


def send_unsolicited_na(iface: str, target: str) -> None:
    """Tell the link that ``target`` is now at this interface's link-layer address (all-nodes
    multicast, hop limit 255). Used as ``HaRoutes(announce=...)``."""
    mac = bytes.fromhex(Path(f"/sys/class/net/{iface}/address").read_text().strip().replace(":", ""))
    index = socket.if_nametoindex(iface)
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        s.sendto(push_unsolicited_na(target, mac), ("ff02::1", 0, 0, index))


__all__ = [
    "DEFAULT_IPV4_TABLE",
    "DEFAULT_TABLE",
    "HOOK_MARK",
    "SEND_MARK",
    "HaRoutes",
    "MnRoutes",
    "NetConfig",
    "RoutesError",
    "Runner",
    "command_runner",
    "push_unsolicited_na",
    "send_unsolicited_na",
]
