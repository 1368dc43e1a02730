"""Routes that keep a mobile node's traffic protected while it is *at home* (docs/testbed.md).

The draft's SPD is host-wide (section 4.2.2): every packet from or to the HoA travels in the
tunnel-mode SA HoA <-> HA, also on the home link ("at home nothing is rewritten: the tunnel SA runs
HoA <-> HA directly", docs/mobility-design.md). Two things make that work on Linux without XFRM:

Home agent (``HaHomeLink``):

* the engine hooks only locally sent packets, so a correspondent's packet the HA *forwards* to a
  HoA at home would leave in clear. While a served mobile node is at home, ``HoA/128 dev TUN``
  stays in place and the binding table maps the HoA to itself: the tunnel module re-sends the
  forwarded packet locally (the engine applies the payload SA), and the resulting ESP (destination
  the HoA) leaves with ``SEND_MARK``;
* ``setup()``: ``ip -6 rule fwmark SEND_MARK lookup TABLE`` with ``HOME_PREFIX dev HOME_IF`` in TABLE,
  so that marked ESP for a HoA goes out of the home link instead of back into the TUN. A marked
  packet for anything else finds no route in TABLE and falls through to the main table;
* a Binding Acknowledgement to a mobile node at home (a de-registration) must not enter the TUN
  (the tunnel module would send it to a care-of address): ``suspended(hoa)`` removes the home
  route for the duration of the send; the route is looked up inside ``sendto``.

Mobile node (``MnHomeLink``): at home the engine's ESP goes straight to the HA, so TCP must size its
segments for the payload SA: ``default via GATEWAY dev HOME_IF metric 1 mtu INNER`` while at home
(the same inner MTU the away route through the TUN has; without it the engine's output would need
IPv6 fragmentation, which the peer's engine drops).

Every change goes through ``ip`` (never per packet); ``cleanup()`` undoes everything.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Iterator

from .routes import DEFAULT_RULE_PREF, SEND_MARK, NetConfig, RoutesError, Runner, command_runner

LOG = logging.getLogger("mipbits.homelink")

DEFAULT_HOME_TABLE = 202  # MnRoutes uses 201 on the mobile node
HOME_ROUTE_METRIC = 1  # the MN's at-home default route wins over the link's own (1024)


class HaHomeLink(NetConfig):
    """A home agent's routes for the mobile nodes that are at home (see the module docstring)."""

    def __init__(self, tun: str, home_if: str, home_prefix: str | ipaddress.IPv6Network,
                 runner: Runner | None = None, *, table: int = DEFAULT_HOME_TABLE,
                 pref: int = DEFAULT_RULE_PREF, mark: int = SEND_MARK) -> None:
        super().__init__(runner)
        self.tun = tun
        self.home_if = home_if
        self.home_prefix = str(ipaddress.IPv6Network(home_prefix))
        self.table = str(table)
        self.pref = str(pref)
        self.mark = f"{mark:#x}/{mark:#x}"
        self.at_home: set[str] = set()  # HoAs whose home route is ours

    def setup(self) -> None:
        """The policy rule and its table (kept while the daemon runs)."""
        rule = ["pref", self.pref, "fwmark", self.mark, "lookup", self.table]
        self.change("setup", ["ip", "-6", "rule", "add", *rule], ["ip", "-6", "rule", "del", *rule])
        route = [self.home_prefix, "dev", self.home_if, "table", self.table]
        self.change("setup", ["ip", "-6", "route", "replace", *route], ["ip", "-6", "route", "del", *route])

    def enter(self, hoa: str | ipaddress.IPv6Address) -> None:
        """``hoa`` is at home: its packets go through the TUN (and so through the engine)."""
        self.run(["ip", "-6", "route", "replace", f"{hoa}/128", "dev", self.tun])
        self.at_home.add(str(ipaddress.IPv6Address(hoa)))

    def forget(self, hoa: str | ipaddress.IPv6Address) -> None:
        """``hoa`` registered a care-of address: the binding's route (the same ``HoA/128 dev TUN``,
        ``HaRoutes.bind``) takes over; nothing is removed, so no packet slips out in between."""
        self.at_home.discard(str(ipaddress.IPv6Address(hoa)))

    def is_home(self, hoa: str | ipaddress.IPv6Address) -> bool:
        return str(ipaddress.IPv6Address(hoa)) in self.at_home

    @contextlib.contextmanager
    def suspended(self, hoa: str | ipaddress.IPv6Address) -> Iterator[None]:
        """Without the home route of ``hoa`` for the duration of the block (a BA sent inside it
        leaves by the home link); a no-op for a HoA that is not at home."""
        key = str(ipaddress.IPv6Address(hoa))
        if key not in self.at_home:
            yield
            return
        self._delete(key)
        try:
            yield
        finally:
            self.enter(key)

    def _delete(self, hoa: str) -> None:
        try:
            self.run(["ip", "-6", "route", "del", f"{hoa}/128", "dev", self.tun])
        except RoutesError as exc:  # already gone (the TUN went away): nothing to undo
            LOG.debug("home route of %s: %s", hoa, exc)

    def cleanup(self) -> list[str]:
        for hoa in sorted(self.at_home):
            self._delete(hoa)
        self.at_home.clear()
        return super().cleanup()


class MnHomeLink:
    """The mobile node's default route with the inner MTU while it is at home."""

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

    def cleanup(self) -> list[str]:
        self.leave()
        return []


__all__ = ["DEFAULT_HOME_TABLE", "HaHomeLink", "MnHomeLink"]
