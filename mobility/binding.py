"""Home agent Binding Cache for home registrations (RFC 6275 sections 9.5.1, 10.3; RFC 5555 4.5).

Sans-I/O. The adapter hands over a Binding Update that already passed ESP (the engine's transport
SA for the HoA authenticated it, RFC 6275 10.3.1 / RFC 4877) and whose Home Address option has been
processed; it gets back the Binding Acknowledgement to send and events to turn into routes,
proxy Neighbor Discovery and tunnel changes::

    ack, events = cache.handle_binding_update(bu, hoa=hoa, src=src, now=now)
    # send ack to the BU's source (RFC 6275 9.5.4: via a type 2 routing header when the BU
    # carried a Home Address option); apply events; re-arm cache.next_timer()
    events = cache.handle_timer(now)

Decisions (docs/binding.md has the table):

* The care-of address comes from the Alternate Care-of Address option (RFC 6275 9.5.1). ESP does
  not protect the IPv6 source, so a *registration* (Lifetime > 0) without one is refused with
  status 174 (Invalid Care-of Address) instead of trusting the source (RFC 6275 11.7.1 makes the
  option mandatory but names no status). A BU that arrived in UDP/IPv4 (DSMIPv6, ``udp_source``
  given) takes its care-of address from the IPv4 Care-of Address option instead (RFC 5555 4.2).
* De-registration: Lifetime 0, or a care-of address equal to the HoA (RFC 6275 10.3.2, 11.5.5).
  The entry stops forwarding at once (``BindingDeleted``) but stays, marked INVALID, for
  MAX_DELETE_BCE_TIMEOUT so that a delayed older BU still gets 135. A retransmitted
  de-registration for such an entry is answered with status 0 again (it still is "an entry marked
  as a home registration", 10.3.2), not 133.
* Silently discarded (RFC 6275 9.5.1, 6.1.7), reported as ``BindingUpdateDiscarded``: a HoA or CoA
  that is not unicast routable, a Nonce Indices option in a home registration, and a correspondent
  registration (H = 0) for a HoA without a binding (no route optimisation here: its Binding
  Authorization Data cannot be checked).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import NamedTuple, Union

from .constants import (
    LIFETIME_UNIT,
    NAT_REFRESH_NOT_NEEDED,
    NATKATIMEOUT,
    BaFlag,
    BaStatus,
    BuFlag,
    Ipv4AckStatus,
)
from .errors import BindingError, MobilityError
from .mh import BindingAck, BindingRefreshRequest, BindingUpdate, lifetime_units
from .options import (
    AlternateCareOfAddress,
    BindingRefreshAdvice,
    Ipv4AddressAck,
    Ipv4CareOfAddress,
    Ipv4HomeAddress,
    MobilityOption,
    NatDetection,
    NonceIndices,
    find_option,
)
from .timers import Deadlines, bce_expiry, bce_purge_deadline, brr_deadline

IPv4Address = ipaddress.IPv4Address
IPv6Address = ipaddress.IPv6Address
IPv6Network = ipaddress.IPv6Network
CareOfAddress = Union[IPv6Address, IPv4Address]

# --- Specification: sequence number arithmetic (RFC 6275 9.5.1) ----------------------------------

SEQ_MOD = 1 << 16
SEQ_HALF = 1 << 15


def seq_gt(a: int, b: int) -> bool:
    """True when sequence number ``a`` is newer than ``b`` modulo 2**16 (RFC 6275 9.5.1): ``b`` and
    the 32768 values before it count as "less than or equal". UMIP/MIPL ``MIP6_SEQ_GT``."""
    return 0 < (a - b) % SEQ_MOD < SEQ_HALF


def seq_next(a: int) -> int:
    """The sequence number after ``a`` (a free-running 16-bit counter: 65535 -> 0)."""
    return (a + 1) % SEQ_MOD


def unicast_routable(addr: IPv6Address | IPv4Address) -> bool:
    """RFC 6275 9.5.1 / 6.1.7 "unicast routable": not multicast, unspecified, loopback, link-local
    (or, for IPv4 care-of addresses, the limited broadcast / reserved 240/4)."""
    if addr.is_multicast or addr.is_unspecified or addr.is_loopback or addr.is_link_local:
        return False
    return not (isinstance(addr, IPv4Address) and addr.is_reserved)


# --- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HomePrefix:
    """An entry of the HA's Prefix List (RFC 6275 10.3.1, RFC 4861 6.3.4). ``valid_until`` and
    ``preferred_until`` are absolute times (same clock as ``now``); None = infinite."""

    prefix: IPv6Network
    valid_until: float | None = None
    preferred_until: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", IPv6Network(self.prefix))


class Ipv4Endpoint(NamedTuple):
    """Outer IPv4 source address and UDP source port of a BU that arrived in UDP/IPv4 (RFC 5555
    4.2: V4ADDR and Z), recorded by the tunnel module *before* IPsec processing."""

    address: IPv4Address
    port: int


@dataclass(frozen=True, slots=True)
class HomeAgentConfig:
    """Home agent policy. Seconds unless noted.

    ``mobile_nodes``: the HoAs this HA serves (None: any HoA on a home prefix); others get 129
    (administratively prohibited, as UMIP's BindingAclPolicy "deny"). ``max_lifetime``: the HA's cap
    on a binding (10.3.1 "MAY further decrease"). ``max_bindings``: above it a new MN gets 130.
    ``refresh_advice_ratio``: when set, BAs carry a Binding Refresh Advice of that fraction of the
    granted lifetime (10.3.1, MAY). ``brr_lead``: when set, a Binding Refresh Request is due that
    many seconds before an entry expires (MAY). ``enabled`` False = not acting as a home agent:
    every home registration gets 131. ``key_mgmt_mobility``: the K bit of the BA (10.3.1: dynamic
    SAs whose endpoint the HA can move); False with manual keys.

    DSMIPv6 (RFC 5555 4.5): ``ipv4_pool`` addresses for dynamic IPv4 HoAs, ``ipv4_static`` the
    statically assigned IPv4 HoA of an IPv6 HoA, ``nat_refresh_time`` the NAT Detection refresh
    time sent when a NAT is detected, ``accept_force_udp`` whether a BU's F flag is honoured (else
    BA status 144), ``force_udp`` whether UDP encapsulation is required of every IPv4 CoA.
    """

    home_prefixes: tuple[HomePrefix, ...]
    mobile_nodes: frozenset[IPv6Address] | None = None
    max_lifetime: float = 3600.0
    max_bindings: int = 1024
    refresh_advice_ratio: float | None = None
    brr_lead: float | None = None
    enabled: bool = True
    key_mgmt_mobility: bool = False
    ipv4_pool: tuple[IPv4Address, ...] = ()
    ipv4_static: Mapping[IPv6Address, IPv4Address] = field(default_factory=dict)
    nat_refresh_time: int = int(NATKATIMEOUT)
    accept_force_udp: bool = True
    force_udp: bool = False

    def __post_init__(self) -> None:
        prefixes = tuple(p if isinstance(p, HomePrefix) else HomePrefix(p) for p in self.home_prefixes)
        object.__setattr__(self, "home_prefixes", prefixes)
        if self.mobile_nodes is not None:
            object.__setattr__(self, "mobile_nodes", frozenset(IPv6Address(a) for a in self.mobile_nodes))
        object.__setattr__(self, "ipv4_pool", tuple(IPv4Address(a) for a in self.ipv4_pool))
        static = {IPv6Address(k): IPv4Address(v) for k, v in dict(self.ipv4_static).items()}
        object.__setattr__(self, "ipv4_static", static)


# --- Binding Cache entries and their lifecycle ----------------------------------------------------


class BceState(Enum):
    """Life of a home registration entry. ABSENT is "no entry" (never stored)."""

    ABSENT = "absent"
    VALID = "valid"  # forwarding: proxy ND for the HoA, tunnel to the CoA
    INVALID = "invalid"  # de-registered, kept MAX_DELETE_BCE_TIMEOUT for the seq check (10.3.2)


class BceInput(Enum):
    REGISTER = "register"  # accepted BU with Lifetime > 0 (10.3.1)
    DEREGISTER = "deregister"  # accepted BU with Lifetime 0 or CoA == HoA (10.3.2)
    EXPIRE = "expire"  # lifetime ran out (10.3.1 "MUST be deleted")
    PURGE = "purge"  # MAX_DELETE_BCE_TIMEOUT after de-registration (10.3.2)


#: (state, input) -> next state. A pair not listed is a bug: ``BceTransitionError``.
BCE_TRANSITIONS: dict[tuple[BceState, BceInput], BceState] = {
    (BceState.ABSENT, BceInput.REGISTER): BceState.VALID,
    (BceState.VALID, BceInput.REGISTER): BceState.VALID,
    (BceState.INVALID, BceInput.REGISTER): BceState.VALID,
    (BceState.VALID, BceInput.DEREGISTER): BceState.INVALID,
    (BceState.INVALID, BceInput.DEREGISTER): BceState.INVALID,
    (BceState.VALID, BceInput.EXPIRE): BceState.ABSENT,
    (BceState.INVALID, BceInput.PURGE): BceState.ABSENT,
}


class BceTransitionError(MobilityError):
    """A Binding Cache entry was asked to make a transition its table does not list (a bug)."""


def bce_transition(state: BceState, event: BceInput) -> BceState:
    try:
        return BCE_TRANSITIONS[(state, event)]
    except KeyError:
        raise BceTransitionError(f"binding cache entry: no transition {state.name} on {event.name}") from None


@dataclass(frozen=True, slots=True)
class BindingCacheEntry:
    """One home registration (RFC 6275 10.1, 9.1). Frozen: the cache replaces it on every change,
    so an entry held by an event is a snapshot.

    ``lifetime`` is the granted lifetime in 4-second units, ``expires`` its absolute end;
    ``seq`` the last accepted sequence number; ``flags`` those of the accepted BU. DSMIPv6 fields
    (RFC 5555 4.5): ``ipv4_hoa``/``ipv4_prefix_len`` the IPv4 home address bound too
    (``ipv4_hoa_dynamic`` when it came from the pool), ``udp_source`` the outer IPv4 source address
    and UDP port the BU arrived from, ``nat_detected`` (that address differs from the IPv4 CoA
    option), ``udp_encap`` (data to the MN goes in UDP to ``udp_source``).
    """

    hoa: IPv6Address
    coa: CareOfAddress
    seq: int
    lifetime: int
    registered_at: float
    expires: float
    flags: BuFlag = BuFlag.A | BuFlag.H
    state: BceState = BceState.VALID
    ipv4_hoa: IPv4Address | None = None
    ipv4_prefix_len: int = 0
    ipv4_hoa_dynamic: bool = False
    udp_source: Ipv4Endpoint | None = None
    nat_detected: bool = False
    udp_encap: bool = False

    @property
    def valid(self) -> bool:
        return self.state is BceState.VALID

    @property
    def lifetime_seconds(self) -> int:
        return self.lifetime * LIFETIME_UNIT

    def remaining(self, now: float) -> float:
        return max(0.0, self.expires - now)

    @property
    def tunnel_destination(self) -> CareOfAddress:
        """Outer destination for packets to the MN: the recorded NAT address with UDP
        encapsulation (RFC 5555 4.5.1 V4ADDR), else the care-of address."""
        if self.udp_encap and self.udp_source is not None:
            return self.udp_source.address
        return self.coa

    def forwarding_key(self) -> tuple:
        """What the data path depends on: a change here is a ``BindingUpdated``, not a refresh."""
        return (self.coa, self.ipv4_hoa, self.ipv4_prefix_len, self.udp_source, self.udp_encap)


# --- events (the I/O layer turns them into routes, proxy ND, tunnel changes, trace lines) --------


class DeleteReason(Enum):
    DEREGISTERED = "deregistered"  # BU with Lifetime 0 or CoA == HoA (10.3.2)
    EXPIRED = "expired"  # lifetime ran out (10.3.1)


class DiscardReason(Enum):
    """Why a BU was silently discarded (no BA: RFC 6275 9.5.1 "MUST be silently discarded")."""

    HOA_NOT_UNICAST = "hoa-not-unicast-routable"  # 9.5.1
    COA_NOT_UNICAST = "coa-not-unicast-routable"  # 6.1.7
    NONCE_INDICES_IN_HOME_REG = "nonce-indices-in-home-registration"  # 9.5.1
    NOT_HOME_REGISTRATION = "correspondent-registration"  # H = 0 and no binding: no RO here


@dataclass(frozen=True, slots=True)
class BindingCreated:
    """A HoA is now away: start proxy ND for ``hoa`` on the home link and tunnel to ``coa``."""

    hoa: IPv6Address
    coa: CareOfAddress
    entry: BindingCacheEntry


@dataclass(frozen=True, slots=True)
class BindingUpdated:
    """The forwarding state of a binding changed (new CoA, NAT mapping, IPv4 HoA, encapsulation)."""

    hoa: IPv6Address
    old_coa: CareOfAddress
    new_coa: CareOfAddress
    entry: BindingCacheEntry
    previous: BindingCacheEntry


@dataclass(frozen=True, slots=True)
class BindingRefreshed:
    """Same forwarding state, new lifetime / sequence number."""

    hoa: IPv6Address
    coa: CareOfAddress
    entry: BindingCacheEntry


@dataclass(frozen=True, slots=True)
class BindingDeleted:
    """Stop proxy ND for ``hoa`` and the tunnel to ``coa`` (and the IPv4 HoA route, if any)."""

    hoa: IPv6Address
    coa: CareOfAddress
    reason: DeleteReason
    entry: BindingCacheEntry


@dataclass(frozen=True, slots=True)
class BindingUpdateRejected:
    """A BU was answered with a rejecting BA (status >= 128); nothing changed."""

    hoa: IPv6Address
    status: int
    detail: str = ""


@dataclass(frozen=True, slots=True)
class BindingUpdateDiscarded:
    """A BU was silently discarded (no BA); nothing changed. For counters and the trace."""

    hoa: IPv6Address
    reason: DiscardReason


@dataclass(frozen=True, slots=True)
class SendBindingRefreshRequest:
    """Send ``message`` to the MN's HoA (through the tunnel): its binding is about to expire."""

    hoa: IPv6Address
    coa: CareOfAddress
    message: BindingRefreshRequest


HaEvent = Union[
    BindingCreated,
    BindingUpdated,
    BindingRefreshed,
    BindingDeleted,
    BindingUpdateRejected,
    BindingUpdateDiscarded,
    SendBindingRefreshRequest,
]


class BuResult(NamedTuple):
    """What ``handle_binding_update`` returns: the BA to send (None = silently discarded) and the
    events, in order."""

    ack: BindingAck | None
    events: list[HaEvent]


class _Discard(Exception):
    """Internal: the BU is silently discarded (never leaves this module)."""

    def __init__(self, reason: DiscardReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


class _Request(NamedTuple):
    """A BU with what the HA derived from it before deciding."""

    bu: BindingUpdate
    hoa: IPv6Address
    coa: CareOfAddress | None
    udp_source: Ipv4Endpoint | None
    nat_detected: bool
    deregistration: bool


class _Ipv4Result(NamedTuple):
    status: int
    hoa: IPv4Address | None
    dynamic: bool


class _TimerKind(Enum):
    EXPIRY = "expiry"
    PURGE = "purge"
    BRR = "brr"


# --- the Binding Cache ---------------------------------------------------------------------------


class BindingCache:
    """The HA's Binding Cache, home registrations only (RFC 6275 section 10)."""

    def __init__(self, config: HomeAgentConfig) -> None:
        self.config = config
        self._entries: dict[IPv6Address, BindingCacheEntry] = {}
        self._timers: Deadlines[tuple[_TimerKind, IPv6Address]] = Deadlines()

    # -- queries ---------------------------------------------------------------------------------

    def lookup(self, hoa: IPv6Address | str) -> BindingCacheEntry | None:
        """The VALID entry for ``hoa`` (what forwarding uses), or None."""
        entry = self._entries.get(IPv6Address(hoa))
        return entry if entry is not None and entry.valid else None

    def lookup_ipv4(self, ipv4_hoa: IPv4Address | str) -> BindingCacheEntry | None:
        """The VALID entry whose IPv4 home address is ``ipv4_hoa`` (RFC 5555 4.5)."""
        ipv4_hoa = IPv4Address(ipv4_hoa)
        for entry in self._entries.values():
            if entry.valid and entry.ipv4_hoa == ipv4_hoa:
                return entry
        return None

    def entry(self, hoa: IPv6Address | str) -> BindingCacheEntry | None:
        """The entry for ``hoa`` in any state (INVALID included)."""
        return self._entries.get(IPv6Address(hoa))

    def entries(self) -> tuple[BindingCacheEntry, ...]:
        return tuple(self._entries.values())

    def __iter__(self) -> Iterator[BindingCacheEntry]:
        return iter(tuple(e for e in self._entries.values() if e.valid))

    def __len__(self) -> int:
        return sum(1 for e in self._entries.values() if e.valid)

    def __contains__(self, hoa: object) -> bool:
        return isinstance(hoa, (str, IPv6Address)) and self.lookup(hoa) is not None

    # -- Binding Update processing (RFC 6275 9.5.1, 10.3.1, 10.3.2) ---------------------------------

    def handle_binding_update(
        self,
        bu: BindingUpdate,
        *,
        hoa: IPv6Address | str,
        src: IPv6Address | str,
        now: float,
        udp_source: Ipv4Endpoint | None = None,
    ) -> BuResult:
        """Process an authenticated BU. ``hoa``: the home address (from the Home Address option,
        else the IPv6 source); ``src``: the packet's IPv6 source after Home Address option
        processing (used only as the RFC 9.5.1 care-of address of a de-registration without an
        Alternate Care-of Address option); ``udp_source``: the outer IPv4 address and UDP port when
        the BU arrived in UDP/IPv4 (DSMIPv6). Never raises on protocol input."""
        hoa = IPv6Address(hoa)
        request: _Request | None = None
        try:
            request = self._classify(bu, hoa, IPv6Address(src), udp_source)
            self._validate(request)
            if request.deregistration:
                return self._deregister(request, now)
            return self._register(request, now)
        except _Discard as discard:
            return BuResult(None, [BindingUpdateDiscarded(hoa, discard.reason)])
        except BindingError as error:
            return self._reject(bu, request, error)

    def _classify(
        self, bu: BindingUpdate, hoa: IPv6Address, src: IPv6Address, udp_source: Ipv4Endpoint | None
    ) -> _Request:
        """Derive CoA, NAT and registration type from the BU (RFC 6275 9.5.1; RFC 5555 4.2)."""
        if not unicast_routable(hoa):
            raise _Discard(DiscardReason.HOA_NOT_UNICAST)
        coa: CareOfAddress | None
        nat = False
        if udp_source is not None:  # DSMIPv6: the CoA is the (ESP-protected) IPv4 CoA option
            option4 = find_option(bu.options, Ipv4CareOfAddress)
            coa = option4.coa if option4 is not None else None
            nat = coa is not None and coa != udp_source.address
        else:
            alt = find_option(bu.options, AlternateCareOfAddress)
            coa = alt.coa if alt is not None else None
        if coa is None and bu.lifetime == 0:
            coa = src  # RFC 6275 9.5.1: the source address; only a de-registration gets here
        dereg = bu.lifetime == 0 or coa == hoa
        if coa is not None and not dereg and not unicast_routable(coa):
            raise _Discard(DiscardReason.COA_NOT_UNICAST)
        return _Request(bu, hoa, coa, udp_source, nat, dereg)

    def _validate(self, request: _Request) -> None:
        """The checks every BU passes before registration or de-registration (9.5.1, 10.3.1)."""
        bu, entry = request.bu, self._entries.get(request.hoa)
        if bu.home_registration and find_option(bu.options, NonceIndices) is not None:
            raise _Discard(DiscardReason.NONCE_INDICES_IN_HOME_REG)
        if not bu.home_registration:
            if entry is None:
                raise _Discard(DiscardReason.NOT_HOME_REGISTRATION)
            raise BindingError(BaStatus.REG_TYPE_CHANGE_DISALLOWED, "H = 0 for a home registration")
        if not self.config.enabled:
            raise BindingError(BaStatus.HOME_REGISTRATION_NOT_SUPPORTED, "not acting as a home agent")
        if entry is not None and not seq_gt(bu.seq, entry.seq):
            raise BindingError(BaStatus.SEQ_OUT_OF_WINDOW, f"seq {bu.seq} <= last accepted {entry.seq}")

    def _reject(self, bu: BindingUpdate, request: _Request | None, error: BindingError) -> BuResult:
        """A rejecting BA: Sequence copied from the BU, except 135 which carries the last accepted
        number (9.5.1); Lifetime 0 (undefined for rejections, 6.1.8)."""
        hoa = request.hoa if request is not None else IPv6Address(0)
        seq = bu.seq
        if error.status == BaStatus.SEQ_OUT_OF_WINDOW:
            seq = self._entries[hoa].seq
        options = self._nat_options(request) if request is not None else ()
        ack = BindingAck(error.status, BaFlag(0), seq, 0, options)
        return BuResult(ack, [BindingUpdateRejected(hoa, int(error.status), error.detail)])

    # -- de-registration (10.3.2) ----------------------------------------------------------------

    def _deregister(self, request: _Request, now: float) -> BuResult:
        entry = self._entries.get(request.hoa)
        if entry is None:
            raise BindingError(BaStatus.NOT_HOME_AGENT, "de-registration without a binding")
        events: list[HaEvent] = []
        if entry.valid:
            events.append(BindingDeleted(entry.hoa, entry.coa, DeleteReason.DEREGISTERED, entry))
        state = bce_transition(entry.state, BceInput.DEREGISTER)
        invalid = replace(
            entry, seq=request.bu.seq, state=state, lifetime=0, expires=now, ipv4_hoa=None,
            ipv4_hoa_dynamic=False,
        )
        self._store(invalid, now)
        # Lifetime 0 and no Binding Refresh Advice (10.3.2); NAT Detection if it came in UDP
        bu = request.bu
        ack = BindingAck(BaStatus.ACCEPTED, self._k_flag(bu), bu.seq, 0, self._nat_options(request))
        return BuResult(ack, events)

    # -- registration (10.3.1) -------------------------------------------------------------------

    def _register(self, request: _Request, now: float) -> BuResult:
        bu, hoa = request.bu, request.hoa
        prefix = self._authorize(request, now)
        previous = self._entries.get(hoa)
        granted = self._granted_lifetime(bu, prefix, now)
        ipv4 = self._ipv4_home_address(bu, hoa, previous)
        ipv4_ok = ipv4 is not None and ipv4.status < 128 and ipv4.hoa is not None
        state = bce_transition(previous.state if previous else BceState.ABSENT, BceInput.REGISTER)
        entry = BindingCacheEntry(
            hoa=hoa,
            coa=request.coa,  # type: ignore[arg-type]  # _authorize checked it
            seq=bu.seq,
            lifetime=granted,
            registered_at=now,
            expires=bce_expiry(now, granted),
            flags=bu.flags,
            state=state,
            ipv4_hoa=ipv4.hoa if ipv4_ok else None,  # type: ignore[union-attr]
            ipv4_prefix_len=32 if ipv4_ok else 0,
            ipv4_hoa_dynamic=ipv4_ok and ipv4.dynamic,  # type: ignore[union-attr]
            udp_source=request.udp_source,
            nat_detected=request.nat_detected,
            udp_encap=self._udp_encap(request),
        )
        self._store(entry, now)
        ack = BindingAck(
            self._accept_status(prefix, granted, now),
            self._k_flag(bu),
            bu.seq,
            granted,
            self._ack_options(request, granted, ipv4),
        )
        return BuResult(ack, [self._change_event(previous, entry)])

    def _authorize(self, request: _Request, now: float) -> HomePrefix:
        """The 10.3.1 tests after validation: 132, 129, 174, 144, 130. Returns the HoA's prefix."""
        prefix = self._home_prefix(request.hoa, now)
        if prefix is None:
            raise BindingError(BaStatus.NOT_HOME_SUBNET, f"{request.hoa} is not on a home prefix")
        allowed = self.config.mobile_nodes
        if allowed is not None and request.hoa not in allowed:
            raise BindingError(BaStatus.ADMIN_PROHIBITED, f"{request.hoa} is not served by this home agent")
        if request.coa is None:
            what = "IPv4 Care-of Address" if request.udp_source else "Alternate Care-of Address"
            raise BindingError(BaStatus.INVALID_COA, f"registration without an {what} option")
        if self._refuses_forced_udp(request):
            raise BindingError(BaStatus.UDP_ENCAPSULATION_REFUSED, "F flag: forced UDP encapsulation refused")
        previous = self._entries.get(request.hoa)
        if (previous is None or not previous.valid) and len(self) >= self.config.max_bindings:
            raise BindingError(BaStatus.INSUFFICIENT_RESOURCES, "binding cache full")
        return prefix

    def _home_prefix(self, hoa: IPv6Address, now: float) -> HomePrefix | None:
        """The Prefix List entry on which ``hoa`` is on-link (10.3.1), if still valid for at least
        one lifetime unit (a prefix with < 4 s left would grant a zero lifetime)."""
        for home in self.config.home_prefixes:
            if hoa in home.prefix:
                if home.valid_until is not None and home.valid_until - now < LIFETIME_UNIT:
                    return None
                return home
        return None

    def _granted_lifetime(self, bu: BindingUpdate, prefix: HomePrefix, now: float) -> int:
        """Lifetime units granted: <= the BU's, <= the HA maximum, <= the prefix's remaining valid
        lifetime (10.3.1), never 0 for a registration (0 would mean deletion)."""
        units = min(bu.lifetime, lifetime_units(self.config.max_lifetime))
        if prefix.valid_until is not None:
            units = min(units, lifetime_units(prefix.valid_until - now))
        return max(units, 1)

    def _accept_status(self, prefix: HomePrefix, granted: int, now: float) -> BaStatus:
        """1 when the prefix is or gets deprecated during the binding, or becomes invalid at its
        end; else 0. Prefix lifetimes compared in 4 s units, two low bits dropped (10.3.1)."""
        if prefix.preferred_until is not None and lifetime_units(prefix.preferred_until - now) < granted:
            return BaStatus.ACCEPTED_PREFIX_DISCOVERY
        if prefix.valid_until is not None and lifetime_units(prefix.valid_until - now) <= granted:
            return BaStatus.ACCEPTED_PREFIX_DISCOVERY
        return BaStatus.ACCEPTED

    def _k_flag(self, bu: BindingUpdate) -> BaFlag:
        """K in the BA: set iff set in the BU and the HA can move its key management endpoint."""
        return BaFlag.K if bu.key_mgmt_mobility and self.config.key_mgmt_mobility else BaFlag(0)

    def _ack_options(
        self, request: _Request, granted: int, ipv4: _Ipv4Result | None
    ) -> tuple[MobilityOption, ...]:
        options: list[MobilityOption] = []
        ratio = self.config.refresh_advice_ratio
        if ratio is not None and 0 < int(granted * ratio) < granted:
            options.append(BindingRefreshAdvice(int(granted * ratio)))  # MUST be < Lifetime (10.3.1)
        if ipv4 is not None:
            prefix_len = 32 if ipv4.status < 128 else 0
            options.append(Ipv4AddressAck(ipv4.status, prefix_len, ipv4.hoa or IPv4Address(0)))
        options.extend(self._nat_options(request))
        return tuple(options)

    def _change_event(self, previous: BindingCacheEntry | None, entry: BindingCacheEntry) -> HaEvent:
        if previous is None or not previous.valid:
            return BindingCreated(entry.hoa, entry.coa, entry)
        if previous.forwarding_key() != entry.forwarding_key():
            return BindingUpdated(entry.hoa, previous.coa, entry.coa, entry, previous)
        return BindingRefreshed(entry.hoa, entry.coa, entry)

    # -- DSMIPv6 (RFC 5555 4.2, 4.5) ---------------------------------------------------------------

    def _refuses_forced_udp(self, request: _Request) -> bool:
        """F = 1 with an IPv4 CoA that this HA does not accept (RFC 5555 4.5: error code 144; F with
        an IPv6 CoA is ignored, 3.1.3 "SHOULD NOT be set")."""
        ipv4_coa = isinstance(request.coa, IPv4Address)
        return request.bu.force_udp and ipv4_coa and not self.config.accept_force_udp

    def _udp_encap(self, request: _Request) -> bool:
        """UDP encapsulation for data: only with an IPv4 CoA, when a NAT was detected or UDP is
        forced (by the MN's F flag or HA policy) (RFC 5555 4.2, 4.5)."""
        if request.udp_source is None or not isinstance(request.coa, IPv4Address):
            return False
        return request.nat_detected or request.bu.force_udp or self.config.force_udp

    def _nat_options(self, request: _Request) -> tuple[MobilityOption, ...]:
        """NAT Detection in every BA to a BU that came in UDP with an IPv4 CoA option (RFC 5555
        4.2 "MUST be present ... if the binding update was encapsulated in UDP"). Refresh time
        ``nat_refresh_time`` when a NAT was detected, all ones when not; F when UDP is forced
        without a NAT. The MN uses UDP iff a NAT was detected or F is set (docs/binding.md)."""
        if request.udp_source is None or not isinstance(request.coa, IPv4Address):
            return ()
        forced = not request.nat_detected and self._udp_encap(request)
        refresh = self.config.nat_refresh_time if request.nat_detected else NAT_REFRESH_NOT_NEEDED
        return (NatDetection(forced, refresh),)

    def _ipv4_home_address(
        self, bu: BindingUpdate, hoa: IPv6Address, previous: BindingCacheEntry | None
    ) -> _Ipv4Result | None:
        """Decide the IPv4 HoA for a BU carrying the IPv4 Home Address option (RFC 5555 4.5);
        None when it has no such option (the IPv4 binding, if any, is removed: 4.4.2.1)."""
        option = find_option(bu.options, Ipv4HomeAddress)
        if option is None:
            return None
        if option.prefix_len == 0:
            return _Ipv4Result(Ipv4AckStatus.FAILURE_UNSPECIFIED, option.hoa, False)  # 3.1.1 error
        if option.p or option.prefix_len != 32:
            return _Ipv4Result(Ipv4AckStatus.PREFIX_ALLOCATION_UNAUTHORIZED, option.hoa, False)
        held = previous.ipv4_hoa if previous is not None and previous.valid else None
        dynamic = bool(previous is not None and previous.ipv4_hoa_dynamic)
        if option.hoa.is_unspecified:
            return self._allocate_ipv4(hoa, held, dynamic)
        return self._check_static_ipv4(option.hoa, hoa, held, dynamic)

    def _allocate_ipv4(self, hoa: IPv6Address, held: IPv4Address | None, dynamic: bool) -> _Ipv4Result:
        static = self.config.ipv4_static.get(hoa)
        if static is not None:
            return _Ipv4Result(Ipv4AckStatus.SUCCESS, static, False)
        if held is not None:
            return _Ipv4Result(Ipv4AckStatus.SUCCESS, held, dynamic)
        free = self._free_pool_addresses()
        if not free:
            return _Ipv4Result(Ipv4AckStatus.DYNAMIC_HOA_NOT_AVAILABLE, None, False)
        return _Ipv4Result(Ipv4AckStatus.SUCCESS, free[0], True)

    def _check_static_ipv4(
        self, requested: IPv4Address, hoa: IPv6Address, held: IPv4Address | None, dynamic: bool
    ) -> _Ipv4Result:
        """A requested IPv4 HoA must be allocated to this MN (4.5): its static address, the one it
        holds, or a free pool address (re-lease after an expired binding)."""
        if not unicast_routable(requested) or requested == IPv4Address("255.255.255.255"):
            return _Ipv4Result(Ipv4AckStatus.INVALID_IPV4_ADDRESS, requested, False)
        if self.config.ipv4_static.get(hoa) == requested:
            return _Ipv4Result(Ipv4AckStatus.SUCCESS, requested, False)
        if held == requested:
            return _Ipv4Result(Ipv4AckStatus.SUCCESS, requested, dynamic)
        if requested in self._free_pool_addresses():
            return _Ipv4Result(Ipv4AckStatus.SUCCESS, requested, True)
        return _Ipv4Result(Ipv4AckStatus.INCORRECT_IPV4_HOA, requested, False)

    def _free_pool_addresses(self) -> list[IPv4Address]:
        taken = {e.ipv4_hoa for e in self._entries.values() if e.valid and e.ipv4_hoa is not None}
        taken.update(self.config.ipv4_static.values())
        return [a for a in self.config.ipv4_pool if a not in taken]

    # -- timers ----------------------------------------------------------------------------------

    def _store(self, entry: BindingCacheEntry, now: float) -> None:
        """Replace the entry for its HoA and re-arm its timers (timers.py has the formulas)."""
        hoa = entry.hoa
        self._entries[hoa] = entry
        for kind in _TimerKind:
            self._timers.cancel((kind, hoa))
        if entry.valid:
            self._timers.arm((_TimerKind.EXPIRY, hoa), entry.expires)
            brr = brr_deadline(entry.expires, entry.registered_at, self.config.brr_lead)
            if brr is not None:
                self._timers.arm((_TimerKind.BRR, hoa), brr)
        else:
            self._timers.arm((_TimerKind.PURGE, hoa), bce_purge_deadline(now))

    def next_timer(self) -> float | None:
        """The earliest absolute deadline (expiry, purge or BRR), or None."""
        return self._timers.next()

    def handle_timer(self, now: float) -> list[HaEvent]:
        """Run every timer due at ``now``: expired entries are deleted (``BindingDeleted``),
        de-registered entries purged, Binding Refresh Requests emitted."""
        events: list[HaEvent] = []
        while (due := self._timers.pop_due(now)) is not None:
            kind, hoa = due
            entry = self._entries[hoa]
            if kind is _TimerKind.BRR:
                events.append(SendBindingRefreshRequest(hoa, entry.coa, BindingRefreshRequest()))
            elif kind is _TimerKind.EXPIRY:
                bce_transition(entry.state, BceInput.EXPIRE)
                self._remove(hoa)
                events.append(BindingDeleted(hoa, entry.coa, DeleteReason.EXPIRED, entry))
            else:
                bce_transition(entry.state, BceInput.PURGE)
                self._remove(hoa)
        return events

    def _remove(self, hoa: IPv6Address) -> None:
        del self._entries[hoa]
        for kind in _TimerKind:
            self._timers.cancel((kind, hoa))
