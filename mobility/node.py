"""The mobility module of one node: a mobile node's or a home agent's control plane (RFC 6275
sections 10 and 11), joining the binding state machines to the tunnel module and the routes.

``MobileNode`` drives a ``BindingUpdateList`` from movements (``mobility.io.netlink.locate``),
received Mobility Header messages and timers; ``HomeAgent`` drives a ``BindingCache``. Neither
opens a socket or reads a clock: ``now`` is a parameter, and what touches the system comes in as
small objects (routes, a ``send`` callable, a ``trace`` callable), so the order of the steps --
which is most of what this module is about -- is tested with fakes (tests/test_mobility_run.py).
The composition root (``mipbits.mobility_run``) builds the real ones and runs the loop.

Order of steps (what the tunnel module and the routes need, docs/tunnel.md):

mobile node
  away:   home link route removed, ``routes.away(...)`` (HoA on the TUN, table of the visited link;
          an IPv4-only link: ``routes.away_ipv4``), then each BU: ``tunnel.expect_binding_update(coa)``
          immediately before the send (an IPv4 CoA: the tunnel module sends it in UDP to the HA's
          port 4191, RFC 5555 4.2); an accepted BA: ``tunnel.binding_acknowledged(coa,
          udp_encap=...)`` (data switches now, Req #3; UDP or IPv6-in-IPv4 as the BA's NAT
          Detection option says); an IPv4 home address granted: ``routes.ipv4_home`` (on the TUN)
  home:   ``routes.home()`` and the home link route *before* the de-registration BU (it leaves
          by the home link); its BA: ``tunnel.returned_home()``
home agent
  BU:     ``tunnel.bu_udp_source`` (Req #4: the outer IPv4 address and port recorded before IPsec
          for a BU that came in UDP), ``cache.handle_binding_update(..., udp_source=)``, the
          binding table and the routes updated *before* the BA is sent (the BA to a new care-of
          address goes through the tunnel); then ``tunnel.expect_binding_ack(hoa, udp_source or
          coa)`` and the send. A BA to a mobile node at
          home (a de-registration) is a local packet to the HoA: it leaves by the home link.
  home:   a mobile node without a binding is "at home": packets forwarded to it still go through
          the engine (``mobility.io.homelink``), the binding table maps the HoA to itself.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .binding import (
    BindingCache,
    BindingCacheEntry,
    BindingCreated,
    BindingDeleted,
    BindingRefreshed,
    BindingUpdated,
    BindingUpdateDiscarded,
    BindingUpdateRejected,
    DeleteReason,
    Ipv4Endpoint,
    SendBindingRefreshRequest,
)
from .bul import (
    BindingAckTimeout,
    BindingExpired,
    BindingLost,
    BindingUpdateList,
    CareOfAddressFallback,
    Ipv4HomeAddressAssigned,
    Ipv4HomeAddressRefused,
    MessageIgnored,
    MnResult,
    OutgoingBindingUpdate,
    Registered,
    RegistrationFailed,
    ReturnedHome,
    SequenceResynchronized,
    StateChanged,
    UdpEncapsulationRefused,
)
from .bul import BindingRefreshed as MnBindingRefreshed
from .mh import BindingAck, BindingErrorMessage, BindingRefreshRequest, BindingUpdate, MobilityMessage, UnknownMessage
from .options import AlternateCareOfAddress, Ipv4CareOfAddress, find_option
from .tunnel import BindingTable, HaTunnel, MnTunnel

IPv4Address = ipaddress.IPv4Address
IPv6Address = ipaddress.IPv6Address
IpAddress = IPv4Address | IPv6Address

HISTORY = 32  # registrations remembered for ``status``

#: ``send(message, dst, src)``: a Mobility Header message out of the MH socket.
Send = Callable[[MobilityMessage, IPv6Address, IPv6Address], None]
#: ``trace(event, fields)``: one decision, written as a trace record (component "mobility").
Trace = Callable[[str, Mapping[str, Any]], None]


def _no_trace(event: str, fields: Mapping[str, Any]) -> None:
    pass


@dataclass(frozen=True, slots=True)
class Location:
    """Where the mobile node is (``mobility.io.netlink.Location`` plus the next hop there)."""

    kind: str  # "home" | "away" | "detached"
    interface: str | None = None
    coa: IpAddress | None = None  # IPv4 on an IPv4-only link (DSMIPv6)
    gateway: str | None = None  # the link's default router (None: unknown / on-link)
    ipv4_coa: IPv4Address | None = None  # a dual-stack link's IPv4 address (RFC 5555 4.4.1)


# --- mobile node ---------------------------------------------------------------------------------------


class MnRoutesPort(Protocol):
    """``mobility.io.routes.MnRoutes``."""

    def away(self, hoa: str, ha: str, iface: str, gateway: str | None, inner_mtu: int) -> None: ...

    def away_ipv4(self, hoa: str, ha: str, inner_mtu: int) -> None: ...

    def ipv4_home(self, addr: str, inner_mtu: int) -> None: ...

    def home(self) -> None: ...


class MnHomePort(Protocol):
    """``mobility.io.homelink.MnHomeLink``."""

    def enter(self, iface: str, gateway: str, mtu: int) -> None: ...

    def leave(self) -> None: ...

    def announce(self, iface: str, address: str | IPv6Address) -> None: ...


class _Attempt:
    """One registration attempt (a move, a refresh, returning home) from its first BU to its BA."""

    __slots__ = ("kind", "coa", "moved_at", "first_bu", "last_bu", "bus", "seq", "outer")

    def __init__(self, kind: str, coa: IpAddress, moved_at: float | None, now: float, seq: int,
                 outer: str | None = None) -> None:
        self.kind, self.coa, self.moved_at = kind, coa, moved_at
        self.first_bu = self.last_bu = now
        self.bus = 1
        self.seq = seq
        self.outer = outer  # "udp ADDR:4191" for a BU in UDP/IPv4 (DSMIPv6)

    def result(self, status: int, seq: int, now: float) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "coa": str(self.coa),
            "outer": self.outer,
            "seq": seq,
            "status": status,
            "bus": self.bus,
            "bu_to_ba": round(now - self.first_bu, 6),  # first BU of the attempt -> BA
            "last_bu_to_ba": round(now - self.last_bu, 6),
            "move_to_ba": None if self.moved_at is None else round(now - self.moved_at, 6),
            "at": now,
        }


class MobileNode:
    """A mobile node's mobility module (RFC 6275 section 11) over the tunnel interface."""

    def __init__(self, bul: BindingUpdateList, tunnel: MnTunnel, routes: MnRoutesPort, home_link: MnHomePort,
                 send: Send, *, inner_mtu: int, trace: Trace = _no_trace) -> None:
        self.bul = bul
        self.tunnel = tunnel
        self.routes = routes
        self.home_link = home_link
        self.send = send
        self.inner_mtu = inner_mtu
        self.trace = trace
        self.hoa = bul.config.hoa
        self.ha = bul.config.ha
        self.location = Location("detached")
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.counters: Counter[str] = Counter()
        self._moved_at: float | None = None
        self._attempt: _Attempt | None = None
        self.ipv4_hoa: IPv4Address | None = None  # granted by the HA (RFC 5555 4.5)

    def start_ipv4_home(self, addr: IPv4Address) -> None:
        """A statically configured IPv4 home address: on the tunnel from the start (the HA's
        static assignment serves it at home too, through the tunnel SA)."""
        self.ipv4_hoa = addr
        self.routes.ipv4_home(str(addr), self.inner_mtu)

    # --- inputs ---

    def moved(self, location: Location, now: float) -> None:
        """Movement detection's verdict (RFC 6275 11.5.1). Only a change of link or address is a
        movement; a detached node keeps its binding and waits."""
        old = self.location
        if (location.kind, location.interface, location.coa) == (old.kind, old.interface, old.coa):
            return
        self.location = location
        self.counters["movements"] += 1
        self.trace("movement", {"detail": f"{old.kind} -> {location.kind}", "kind": location.kind,
                                "interface": location.interface, "coa": _text(location.coa),
                                "gateway": location.gateway})
        if location.kind == "detached":
            return
        self._moved_at = now
        if location.kind == "home":
            self.routes.home()  # before the de-registration: it leaves by the home link (11.5.5)
            self.home_link.enter(location.interface or "", location.gateway or str(self.ha), self.inner_mtu)
            self._apply(self.bul.movement(self.hoa, now), now)
        else:
            self.home_link.leave()
            coa = location.coa
            if coa is not None and coa.version == 4:  # an IPv4-only link: DSMIPv6 (RFC 5555 4.4.1)
                self.routes.away_ipv4(str(self.hoa), str(self.ha), self.inner_mtu)
            else:
                self.routes.away(str(self.hoa), str(self.ha), location.interface or "", location.gateway,
                                 self.inner_mtu)
                self.home_link.announce(location.interface or "", coa)  # type: ignore[arg-type]
            self._apply(self.bul.movement(coa, now, ipv4_coa=location.ipv4_coa), now)  # type: ignore[arg-type]

    def received(self, message: MobilityMessage | UnknownMessage, src: IPv6Address, dst: IPv6Address,
                 now: float) -> None:
        """A Mobility Header message that came through the engine (authenticated by its SA)."""
        if src != self.ha or dst != self.hoa:
            self._ignored(message, src, f"not HA -> HoA ({src} -> {dst})")
            return
        if isinstance(message, BindingAck):
            self.counters["ba_received"] += 1
            self.trace("ba-received", {"seq": message.seq, "status": int(message.status),
                                       "lifetime": message.lifetime_seconds,
                                       "detail": f"status {int(message.status)} lifetime {message.lifetime_seconds}"})
            result = self.bul.handle_binding_ack(message, now)
            self._close_attempt(message, result, now)
            self._apply(result, now)
        elif isinstance(message, BindingRefreshRequest):
            self.counters["brr_received"] += 1
            self.trace("brr-received", {})
            self._apply(self.bul.handle_binding_refresh_request(now), now)
        elif isinstance(message, BindingErrorMessage):
            self.counters["be_received"] += 1
            self.trace("be-received", {"status": int(message.status), "detail": f"status {int(message.status)}"})
            self._apply(self.bul.handle_binding_error(message, now), now)
        else:
            self._ignored(message, src, "not a BA, BRR or BE")

    def next_timer(self) -> float | None:
        return self.bul.next_timer()

    def handle_timer(self, now: float) -> None:
        self._apply(self.bul.handle_timer(now), now)

    # --- outputs ---

    def _apply(self, result: MnResult, now: float) -> None:
        for out in result.messages:
            self._send_bu(out, now)
        for ev in result.events:
            self._event(ev)

    def _send_bu(self, out: OutgoingBindingUpdate, now: float) -> None:
        """Every BU leaves the MH socket from the HoA; the tunnel module gives it its path: a Home
        Address option from an IPv6 CoA, UDP to the HA's port 4191 from an IPv4 CoA (RFC 5555
        4.2), nothing at home."""
        coa = ipaddress.ip_address(out.src)
        outer = None if out.udp_to is None else f"udp {coa} -> {out.udp_to}:4191"
        self._track_attempt(out, coa, now, outer)
        if out.home_address_option or out.udp_to is not None:
            self.tunnel.expect_binding_update(coa)  # right before the send: the heuristic locks on it
        self.send(out.bu, out.ha, out.hoa)
        self.counters["bu_sent"] += 1
        self.counters["bu_sent_udp" if outer else "bu_sent_ipv6"] += 1
        fields: dict[str, Any] = {"seq": out.bu.seq, "coa": str(coa), "lifetime": out.bu.lifetime_seconds,
                                  "detail": f"coa {coa} lifetime {out.bu.lifetime_seconds}"
                                            + (f" in {outer}" if outer else "")}
        if outer:
            fields["outer"] = outer
        self.trace("bu-sent", fields)

    def _track_attempt(self, out: OutgoingBindingUpdate, coa: IpAddress, now: float, outer: str | None) -> None:
        attempt = self._attempt
        if attempt is not None and attempt.coa == coa and self._moved_at is None:
            attempt.bus += 1
            attempt.last_bu, attempt.seq = now, out.bu.seq
            return
        kind = "deregister" if out.bu.lifetime == 0 else ("move" if self._moved_at is not None else "refresh")
        self._attempt = _Attempt(kind, coa, self._moved_at, now, out.bu.seq, outer)
        self._moved_at = None

    def _close_attempt(self, ba: BindingAck, result: MnResult, now: float) -> None:
        final = (Registered, MnBindingRefreshed, ReturnedHome, RegistrationFailed)
        if self._attempt is None or not any(isinstance(e, final) for e in result.events):
            return
        entry = self._attempt.result(int(ba.status), ba.seq, now)
        binding = self.bul.binding
        if binding is not None and entry["status"] < 128:  # DSMIPv6: what the BA's NAT Detection said
            entry.update(nat_detected=binding.nat_detected, udp_encap=binding.udp_encap,
                         keepalive=binding.keepalive)
        self.history.append(entry)
        self._attempt = None

    def _event(self, ev: object) -> None:
        if isinstance(ev, Registered):
            # Req #3: data moves to the new CoA now; in UDP or IPv6-in-IPv4 as the BA said
            self.tunnel.binding_acknowledged(ev.coa, udp_encap=ev.udp_encap)
            how = "" if ev.coa.version == 6 else (
                ", NAT detected: data in UDP" if ev.nat_detected else
                (", data in UDP (F)" if ev.udp_encap else ", no NAT: data IPv6-in-IPv4"))
            self.trace("registered", {"coa": str(ev.coa), "lifetime": ev.lifetime, "nat": ev.nat_detected,
                                      "udp_encap": ev.udp_encap,
                                      "detail": f"coa {ev.coa} lifetime {ev.lifetime} (was {ev.previous_coa}){how}"})
        elif isinstance(ev, Ipv4HomeAddressAssigned):
            self.ipv4_hoa = ev.ipv4_hoa
            self.routes.ipv4_home(str(ev.ipv4_hoa), self.inner_mtu)
            self.trace("ipv4-hoa", {"detail": f"IPv4 home address {ev.ipv4_hoa}/{ev.prefix_len} on the tunnel"})
        elif isinstance(ev, ReturnedHome):
            self.tunnel.returned_home()
            if self.location.kind == "home" and self.location.interface:
                self.home_link.announce(self.location.interface, ev.hoa)  # RFC 6275 11.5.5
            self.trace("returned-home", {"detail": f"HoA {ev.hoa} used on the home link"})
        elif isinstance(ev, StateChanged):
            self.trace("state", {"detail": f"{ev.old.value} -> {ev.new.value} ({ev.input.value})"})
        else:
            self.trace(_EVENT_NAMES.get(type(ev), "event"), {"detail": _describe(ev)})

    def _ignored(self, message: object, src: IPv6Address, why: str) -> None:
        self.counters["mh_ignored"] += 1
        self.trace("mh-ignored", {"detail": f"{type(message).__name__} from {src}: {why}"})

    # --- status ---

    def status(self, now: float) -> dict[str, Any]:
        bul = self.bul
        out = bul.outstanding
        binding = bul.binding
        loc = self.location
        return {
            "role": "mn",
            "hoa": str(self.hoa),
            "ha": str(self.ha),
            "location": {"kind": loc.kind, "interface": loc.interface, "coa": _text(loc.coa),
                         "gateway": loc.gateway, "ipv4_coa": _text(loc.ipv4_coa)},
            "ipv4_hoa": _text(self.ipv4_hoa),
            "bul": {
                "state": bul.state.value,
                "coa": _text(bul.coa),
                "next_seq": bul.next_seq,
                "outstanding": None if out is None else {"seq": out.seq, "lifetime": out.lifetime_seconds},
                "binding": None if binding is None else {
                    "coa": str(binding.coa),
                    "lifetime": binding.lifetime,
                    "expires_in": round(binding.expires - now, 3),
                    "refresh_in": round(binding.refresh_at - now, 3),
                    "udp_encap": binding.udp_encap,
                    "nat_detected": binding.nat_detected,
                    "keepalive": binding.keepalive,
                },
                "next_timer_in": None if bul.next_timer() is None else round(bul.next_timer() - now, 3),  # type: ignore[operator]
            },
            "history": list(self.history),
            "counters": dict(self.counters),
            "tunnel": self.tunnel.status(),
        }


_EVENT_NAMES: dict[type, str] = {
    MnBindingRefreshed: "refreshed",
    Ipv4HomeAddressRefused: "ipv4-hoa-refused",
    UdpEncapsulationRefused: "udp-refused",
    CareOfAddressFallback: "coa-fallback",
    RegistrationFailed: "registration-failed",
    BindingAckTimeout: "ba-timeout",
    BindingExpired: "binding-expired",
    BindingLost: "binding-lost",
    SequenceResynchronized: "seq-resync",
    MessageIgnored: "mh-ignored",
}


def _describe(ev: object) -> str:
    fields = getattr(ev, "__dataclass_fields__", {})
    parts = []
    for name in fields:
        value = getattr(ev, name)
        parts.append(f"{name} {getattr(value, 'value', value)}")
    return ", ".join(parts)


def _text(addr: object) -> str | None:
    return None if addr is None else str(addr)


# --- home agent ------------------------------------------------------------------------------------------


class HaRoutesPort(Protocol):
    """``mobility.io.routes.HaRoutes``."""

    def apply(self, events: Sequence[object]) -> None: ...


class HaHomePort(Protocol):
    """``mobility.io.homelink.HaHomeLink``."""

    def serve(self, hoa: str | IPv6Address) -> None: ...

    def arrived(self, hoa: str | IPv6Address) -> None: ...

    def serve_ipv4(self, hoa4: str | IPv4Address) -> None: ...

    def release_ipv4(self, hoa4: str | IPv4Address) -> None: ...


class HomeAgent:
    """A home agent's mobility module (RFC 6275 section 10) over the tunnel interface.

    ``mobile_nodes``: HoAs served from the start, at home until they register (packets forwarded
    to them go through the engine from the start); another HoA is served from its first binding on.
    A HoA whose binding ends is at home again. ``ipv4_static``: IPv4 home addresses assigned by
    configuration (RFC 5555 4.5), served like their HoA -- from the start, at home too; one
    from the pool is served while its binding lives.
    """

    def __init__(self, cache: BindingCache, table: BindingTable, tunnel: HaTunnel, routes: HaRoutesPort,
                 home_link: HaHomePort, send: Send, *, address: IPv6Address,
                 mobile_nodes: Iterable[IPv6Address] = (), trace: Trace = _no_trace,
                 ipv4_static: Mapping[IPv6Address, IPv4Address] | None = None) -> None:
        self.cache = cache
        self.table = table
        self.tunnel = tunnel
        self.routes = routes
        self.home_link = home_link
        self.send = send
        self.address = IPv6Address(address)
        self.mobile_nodes = tuple(IPv6Address(a) for a in mobile_nodes)
        self.ipv4_static = {IPv6Address(k): IPv4Address(v) for k, v in (ipv4_static or {}).items()}
        self.trace = trace
        self.counters: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()  # BAs sent per status

    def start(self) -> None:
        """Every served mobile node starts at home (until it registers)."""
        for hoa in self.mobile_nodes:
            self.home_link.serve(hoa)
            self.table.set(hoa, hoa)  # the tunnel module re-sends forwarded packets to the engine
            hoa4 = self.ipv4_static.get(hoa)
            if hoa4 is not None:
                self.home_link.serve_ipv4(hoa4)
                self.table.set_ipv4_hoa(hoa4, hoa)

    # --- inputs ---

    def received(self, message: MobilityMessage | UnknownMessage, src: IPv6Address, dst: IPv6Address,
                 now: float) -> None:
        """A Mobility Header message that came through the engine: its source is the HoA (the
        tunnel module swapped the Home Address option in before IPsec)."""
        if not isinstance(message, BindingUpdate) or dst != self.address:
            self.counters["mh_ignored"] += 1
            self.trace("mh-ignored", {"detail": f"{type(message).__name__} {src} -> {dst}"})
            return
        self._binding_update(message, src, now)

    def next_timer(self) -> float | None:
        return self.cache.next_timer()

    def handle_timer(self, now: float) -> None:
        self._apply(self.cache.handle_timer(now))

    # --- Binding Updates (RFC 6275 10.3) ---

    def _binding_update(self, bu: BindingUpdate, hoa: IPv6Address, now: float) -> None:
        alt = find_option(bu.options, AlternateCareOfAddress)
        coa4 = find_option(bu.options, Ipv4CareOfAddress)
        seen = self.tunnel.seen_coa(hoa)
        # Req #4 after IPsec: the outer IPv4 address/port recorded before IPsec for this (now
        # authenticated) BU; None for a BU that came over IPv6 (draft 4.4.2, RFC 5555 4.2)
        udp_source = self.tunnel.bu_udp_source(hoa, bu, now)
        self.counters["bu_received"] += 1
        if udp_source is not None:
            self.counters["bu_received_udp"] += 1
        coa = coa4.coa if coa4 else (alt.coa if alt else None)
        outer = None if udp_source is None else f"udp {udp_source.address}:{udp_source.port}"
        fields: dict[str, Any] = {
            "seq": bu.seq, "hoa": str(hoa), "coa": _text(coa),
            "seen": None if seen is None else str(ipaddress.ip_address(seen)), "lifetime": bu.lifetime_seconds,
            "detail": f"hoa {hoa} coa {coa or '-'} lifetime {bu.lifetime_seconds}"
                      + (f", outer {outer} ({'NAT' if str(udp_source.address) != str(coa) else 'no NAT'})"
                         if udp_source is not None else "")}
        if outer is not None:
            fields["outer"] = outer
        self.trace("bu-received", fields)
        ack, events = self.cache.handle_binding_update(bu, hoa=hoa, src=hoa, now=now, udp_source=udp_source)
        self._apply(events)  # table and routes before the BA: a BA to a new CoA uses them
        if ack is not None:
            if udp_source is not None:  # RFC 5555 4.2: back in UDP to V4ADDR:Z, rejections too
                self._send_ack(ack, bu, hoa, udp_source)
            else:
                self._send_ack(ack, bu, hoa, alt.coa if alt else (ipaddress.ip_address(seen) if seen else None))

    def _send_ack(self, ack: BindingAck, bu: BindingUpdate, hoa: IPv6Address,
                  coa: IPv6Address | IPv4Address | Ipv4Endpoint | None) -> None:
        """RFC 6275 9.5.4: to the BU's care-of address (through the tunnel module, which adds the
        type 2 routing header), or -- from a mobile node at home -- by the home link. A BU that
        came in UDP/IPv4 is answered in UDP to where it came from (``Ipv4Endpoint``), also when
        the BA rejects it (RFC 5555 4.2)."""
        udp = isinstance(coa, Ipv4Endpoint)
        away = udp or (bu.lifetime > 0 and coa is not None and coa != hoa)
        if away:
            self.tunnel.expect_binding_ack(hoa, coa)  # type: ignore[arg-type]
        self.send(ack, hoa, self.address)
        self.counters["ba_sent"] += 1
        self.statuses[int(ack.status)] += 1
        to = f"udp {coa.address}:{coa.port}" if udp else str(coa if away else hoa)  # type: ignore[union-attr]
        self.trace("ba-sent", {"seq": ack.seq, "hoa": str(hoa), "status": int(ack.status),
                               "lifetime": ack.lifetime_seconds, "coa": to,
                               "detail": f"status {int(ack.status)} to {to} lifetime {ack.lifetime_seconds}"})

    def _apply(self, events: Sequence[object]) -> None:
        self.table.apply(events)
        self.routes.apply(events)
        for ev in events:
            if isinstance(ev, BindingCreated):
                self.home_link.serve(ev.hoa)  # a HoA not configured: served from now on
            if isinstance(ev, (BindingCreated, BindingUpdated)):
                self._ipv4_home(ev.hoa, ev.entry, getattr(ev, "previous", None))
            elif isinstance(ev, BindingDeleted):
                self.table.set(ev.hoa, ev.hoa)  # at home: forwarded packets still reach the engine
                self._ipv4_home(ev.hoa, None, ev.entry)
                if ev.reason is DeleteReason.DEREGISTERED:
                    self.home_link.arrived(ev.hoa)
            self._event(ev)

    def _ipv4_home(self, hoa: IPv6Address, entry: BindingCacheEntry | None,
                   previous: BindingCacheEntry | None) -> None:
        """The IPv4 home address of ``hoa`` (RFC 5555 4.5): routed into the TUN while granted; a
        static one stays served (at home: through the tunnel SA on the home link)."""
        static = self.ipv4_static.get(hoa)
        now4 = entry.ipv4_hoa if entry is not None else None
        old4 = previous.ipv4_hoa if previous is not None else None
        if old4 is not None and old4 != now4 and old4 != static:
            self.home_link.release_ipv4(old4)
        if now4 is not None:
            self.home_link.serve_ipv4(now4)
        elif static is not None and hoa in self.mobile_nodes:
            self.table.set_ipv4_hoa(static, hoa)

    def _event(self, ev: object) -> None:
        if isinstance(ev, BindingCreated):
            self.trace("binding-created", _entry_fields(ev.entry, f"{ev.hoa} at {ev.coa}"))
        elif isinstance(ev, BindingUpdated):
            self.trace("binding-updated", _entry_fields(ev.entry, f"{ev.hoa} {ev.old_coa} -> {ev.new_coa}"))
        elif isinstance(ev, BindingRefreshed):
            self.trace("binding-refreshed", _entry_fields(ev.entry, f"{ev.hoa} at {ev.coa}"))
        elif isinstance(ev, BindingDeleted):
            self.trace("binding-deleted", _entry_fields(ev.entry, f"{ev.hoa} ({ev.reason.value})"))
        elif isinstance(ev, BindingUpdateRejected):
            self.counters["bu_rejected"] += 1
            self.trace("bu-rejected", {"hoa": str(ev.hoa), "status": ev.status,
                                       "detail": f"status {ev.status}: {ev.detail}"})
        elif isinstance(ev, BindingUpdateDiscarded):
            self.counters["bu_discarded"] += 1
            self.trace("bu-discarded", {"hoa": str(ev.hoa), "detail": ev.reason.value})
        elif isinstance(ev, SendBindingRefreshRequest):
            self.send(ev.message, ev.hoa, self.address)
            self.counters["brr_sent"] += 1
            self.trace("brr-sent", {"hoa": str(ev.hoa), "coa": str(ev.coa)})

    # --- status ---

    def status(self, now: float) -> dict[str, Any]:
        return {
            "role": "ha",
            "address": str(self.address),
            "bindings": [_entry_status(e, now) for e in self.cache.entries()],
            "at_home": sorted(str(h) for h in self.mobile_nodes if self.cache.lookup(h) is None),
            "ipv4_hoas": self.table.ipv4_hoas(),
            "counters": dict(self.counters),
            "ba_status": {str(k): v for k, v in sorted(self.statuses.items())},
            "tunnel": self.tunnel.status(),
        }


def _entry_fields(entry: BindingCacheEntry, detail: str) -> dict[str, Any]:
    fields: dict[str, Any] = {"hoa": str(entry.hoa), "coa": str(entry.coa), "seq": entry.seq,
                              "lifetime": entry.lifetime_seconds, "detail": detail}
    if entry.udp_source is not None:  # DSMIPv6: what Req #4 recorded and what it means
        fields.update(outer=_endpoint_text(entry), nat=entry.nat_detected, udp_encap=entry.udp_encap)
        fields["detail"] = f"{detail}, outer {fields['outer']}, " + (
            "NAT detected: data in UDP" if entry.nat_detected else
            ("data in UDP (F)" if entry.udp_encap else "no NAT: data IPv6-in-IPv4"))
    if entry.ipv4_hoa is not None:
        fields["ipv4_hoa"] = str(entry.ipv4_hoa)
    return fields


def _endpoint_text(entry: BindingCacheEntry) -> str | None:
    ep = entry.udp_source
    return None if ep is None else f"{ep.address}:{ep.port}"


def _entry_status(entry: BindingCacheEntry, now: float) -> dict[str, Any]:
    return {
        "hoa": str(entry.hoa),
        "coa": str(entry.coa),
        "seq": entry.seq,
        "state": entry.state.value,
        "lifetime": entry.lifetime_seconds,
        "remaining": round(entry.remaining(now), 3),
        "registered_at": entry.registered_at,
        "flags": int(entry.flags),
        "udp_source": _endpoint_text(entry),
        "nat_detected": entry.nat_detected,
        "udp_encap": entry.udp_encap,
        "ipv4_hoa": _text(entry.ipv4_hoa),
    }


__all__ = ["HISTORY", "HomeAgent", "Location", "MobileNode", "Send", "Trace"]
