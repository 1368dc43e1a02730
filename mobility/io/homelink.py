"""Routes that keep a mobile node's traffic protected while it is *at home* (docs/testbed.md).

The draft's SPD is host-wide (section 4.2.2): every packet from or to the HoA travels in the
tunnel-mode SA HoA <-> HA, also on the home link ("at home nothing is rewritten: the tunnel SA runs
HoA <-> HA directly", docs/mobility-design.md). Two things make that work on Linux without XFRM:

Home agent (``HaHomeLink``). The engine hooks only *locally sent* packets, so a correspondent's
packet the HA forwards to a HoA would leave in clear. For every served HoA two policy rules split
the traffic to it by where it comes from::

    pref 1000  iif lo  to HoA  lookup main     # the HA's own packets: BAs, the engine's ESP
    pref 1001          to HoA  lookup 202      # forwarded ones: 202 holds "default dev TUN"

so a forwarded packet *always* enters the TUN, where the tunnel module re-sends it locally and the
engine applies the payload SA -- at home (the binding table maps the HoA to itself, and the ESP
leaves by the home link through the main table) and away alike (the main table then has
``HaRoutes``' ``HoA/128 dev TUN`` and the ESP comes back into the TUN to be sent to the CoA). There
is no moment, not even while a binding is deleted, when a forwarded packet could leave in clear.
A Binding Acknowledgement to a node that just came home is a local packet: it leaves by the home
link without entering the tunnel module.

IPv4 home addresses (DSMIPv6, RFC 5555 4.5; ``serve_ipv4`` / ``release_ipv4``): the main table
routes ``HoA4/32 dev TUN mtu INNER`` -- forwarded IPv4 for it always enters the tunnel module,
which re-sends it locally so the engine puts it into the HoA's IPv6 tunnel SA. The inner MTU on
the route has the kernel fragment or refuse (DF) what would not fit. A static IPv4 HoA is served
from the start, at home too; one from the pool while its binding lives.

``arrived(hoa)``: while the node was away the HA advertised the HoA with its own link-layer address
(proxy ND, unsolicited NA), and a multicast NA is looped back to its sender, so the HA's own
neighbour entry for the HoA may name the HA itself. It is deleted when the node comes home, and
the next packet to the HoA resolves it afresh.

Mobile node (``MnHomeLink``). At home the engine's ESP goes straight to the HA, so TCP must size its
segments for the payload SA: ``default via GATEWAY dev HOME_IF metric 1 mtu INNER`` while at home
(the inner MTU the away route through the TUN has; without it the engine's output would need
IPv6 fragmentation, which the peer's engine drops). ``announce(iface, address)`` multicasts an
unsolicited Neighbor Advertisement (RFC 4861 7.2.6, R = 0, O = 1, not looped back): for the HoA
when the de-registration is acknowledged (RFC 6275 11.5.5), for a care-of address when the node
attaches to a visited link (a router that still has an entry from an earlier visit, perhaps being
probed, takes the node's address at once instead of after its next probe).

Every change goes through ``ip`` (never per packet); ``cleanup()`` undoes everything.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path

from .routes import NetConfig, RoutesError, Runner, command_runner, push_unsolicited_na

LOG = logging.getLogger("mipbits.homelink")

DEFAULT_HOME_TABLE = 202  # MnRoutes uses 201 on the mobile node
DEFAULT_HOME_PREF = 1000  # the local rule; the forwarded rule is the next preference
HOME_ROUTE_METRIC = 1  # the MN's at-home default route wins over the link's own (1024)
IPV6_MULTICAST_LOOP = getattr(socket, "IPV6_MULTICAST_LOOP", 19)


class HaHomeLink(NetConfig):
    """A home agent's policy routing for the HoAs it serves (see the module docstring)."""

    def __init__(self, tun: str, home_if: str, runner: Runner | None = None, *,
                 table: int = DEFAULT_HOME_TABLE, pref: int = DEFAULT_HOME_PREF,
                 inner_mtu: int | None = None) -> None:
        super().__init__(runner)
        self.tun = tun
        self.home_if = home_if
        self.table = str(table)
        self.pref = pref
        self.inner_mtu = inner_mtu
        self.served: set[str] = set()
        self.served_ipv4: set[str] = set()

    def setup(self) -> None:
        """The table forwarded packets for served HoAs look up."""
        route = ["default", "dev", self.tun, "table", self.table]
        self.change("setup", ["ip", "-6", "route", "replace", *route], ["ip", "-6", "route", "del", *route])

    def serve(self, hoa: str | ipaddress.IPv6Address) -> None:
        """Forwarded packets for ``hoa`` go through the tunnel module from now on. Idempotent."""
        key = str(ipaddress.IPv6Address(hoa))
        if key in self.served:
            return
        local = ["pref", str(self.pref), "iif", "lo", "to", f"{key}/128", "lookup", "main"]
        forwarded = ["pref", str(self.pref + 1), "to", f"{key}/128", "lookup", self.table]
        for rule in (local, forwarded):
            self.change(f"serve {key}", ["ip", "-6", "rule", "add", *rule], ["ip", "-6", "rule", "del", *rule])
        self.served.add(key)

    def serve_ipv4(self, hoa4: str | ipaddress.IPv4Address) -> None:
        """Forwarded IPv4 for the IPv4 home address ``hoa4`` goes into the TUN. Idempotent."""
        key = str(ipaddress.IPv4Address(hoa4))
        if key in self.served_ipv4:
            return
        route = [f"{key}/32", "dev", self.tun]
        mtu = ["mtu", str(self.inner_mtu)] if self.inner_mtu else []
        self.change(f"serve4 {key}", ["ip", "-4", "route", "replace", *route, *mtu],
                    ["ip", "-4", "route", "del", *route])
        self.served_ipv4.add(key)

    def release_ipv4(self, hoa4: str | ipaddress.IPv4Address) -> None:
        key = str(ipaddress.IPv4Address(hoa4))
        self.served_ipv4.discard(key)
        self.revert(f"serve4 {key}")

    def arrived(self, hoa: str | ipaddress.IPv6Address) -> None:
        """``hoa`` is on the home link again: forget what our own proxy advertisements taught us."""
        try:
            self.run(["ip", "-6", "neigh", "del", str(ipaddress.IPv6Address(hoa)), "dev", self.home_if])
        except RoutesError as exc:  # no entry: nothing to forget
            LOG.debug("neighbour entry of %s: %s", hoa, exc)

    def cleanup(self) -> list[str]:
        self.served.clear()
        self.served_ipv4.clear()
        return super().cleanup()


class MnHomeLink:
    """The mobile node's default route with the inner MTU while it is at home, and its
    unsolicited Neighbor Advertisements."""

    def __init__(self, runner: Runner | None = None, *, metric: int = HOME_ROUTE_METRIC) -> None:
        self.run = runner or command_runner()
        self.metric = str(metric)
        self.route: list[str] | None = None  # the route we installed

    def enter(self, iface: str, gateway: str, mtu: int) -> None:
        self.leave()
        route = ["default", "via", gateway, "dev", iface, "metric", self.metric]
        self.run(["ip", "-6", "route", "replace", *route, "mtu", str(mtu)])
        self.route = route

    def leave(self) -> None:
        """Remove our route; the link going down may already have taken it with it."""
        if self.route is None:
            return
        route, self.route = self.route, None
        try:
            self.run(["ip", "-6", "route", "del", *route])
        except RoutesError as exc:
            LOG.debug("home default route: %s", exc)

    def announce(self, iface: str, address: str | ipaddress.IPv6Address) -> None:
        """Best effort: a link without a neighbour to tell is not an error."""
        try:
            send_na(iface, str(address))
        except OSError as exc:
            LOG.warning("unsolicited NA for %s on %s: %s", address, iface, exc)

    def cleanup(self) -> list[str]:
        self.leave()
        return []


def send_na(iface: str, target: str, router: bool = False) -> None:
    """An unsolicited NA for ``target`` with this interface's link-layer address to all-nodes
    (RFC 4861 7.2.6: S = 0, O = 1), hop limit 255, not looped back to ourselves."""
    mac = bytes.fromhex(Path(f"/sys/class/net/{iface}/address").read_text().strip().replace(":", ""))
    index = socket.if_nametoindex(iface)
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_LOOP, 0)
        s.sendto(push_unsolicited_na(target, mac, router=router), ("ff02::1", 0, 0, index))


__all__ = ["DEFAULT_HOME_TABLE", "HaHomeLink", "MnHomeLink", "send_na"]
