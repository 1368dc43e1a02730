"""Mobile node Binding Update List: the home registration state machine (RFC 6275 section 11).

Sans-I/O. Inputs are movements, received messages (already authenticated by ESP, RFC 6275
11.7.3) and timers; outputs are Binding Updates to send and events::

    bul = BindingUpdateList(MobileNodeConfig(hoa=..., ha=...), rand=os.urandom)
    msgs, events = bul.movement(coa, now)          # new CoA (coa == hoa: back home)
    for out in msgs: send(out.push(), ...)        # out.src, out.home_address_option, out.udp_to
    msgs, events = bul.handle_binding_ack(ba, now)
    msgs, events = bul.handle_timer(now)          # at bul.next_timer()

One entry (the home agent) per BindingUpdateList. The state machine is ``MnState`` plus
``MN_TRANSITIONS``; ``StateChanged`` events report every change of state. Timers and their formulas
are listed in ``mobility.timers``. Decisions (docs/binding.md):

* The first BU of an attempt starts the back-off at InitialBindackTimeoutFirstReg (1.5 s) when the
  MN knows of no live binding at the HA, else INITIAL_BINDACK_TIMEOUT (1 s); each retransmission
  uses the next sequence number and doubles the timeout up to MAX_BINDACK_TIMEOUT (32 s), then
  keeps sending every 32 s (11.7.1, 11.8). At most MAX_UPDATE_RATE BUs per second: a BU over the
  rate waits (11.8).
* Only a BA whose Sequence equals the latest BU sent is taken (11.7.3); a 135 BA (any Sequence)
  resynchronises: next BU = its Sequence + 1, sent at once.
* Refresh at the earliest of 80% of the granted lifetime, the Binding Refresh Advice, and (behind a
  NAT) the NAT keepalive period, counted from when the acknowledged BU was sent (11.7.3).
* Returning home always sends a de-registration (Lifetime 0, CoA = HoA, from the HoA without a
  Home Address option, 11.5.5) unless the MN was already HOME; status 133 to it means "no binding
  left", which is what the MN wanted.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple, Union

from .binding import CareOfAddress, seq_next
from .constants import (
    DEFAULT_INITIAL_BINDACK_TIMEOUT_FIRST_REG,
    MAX_UPDATE_RATE,
    NAT_REFRESH_NOT_NEEDED,
    NATKATIMEOUT,
    BaStatus,
    BeStatus,
    BuFlag,
)
from .errors import MobilityError
from .mh import BindingAck, BindingErrorMessage, BindingUpdate, lifetime_units, push_mh
from .options import (
    AlternateCareOfAddress,
    BindingRefreshAdvice,
    Ipv4AddressAck,
    Ipv4CareOfAddress,
    Ipv4HomeAddress,
    MobilityOption,
    NatDetection,
    find_option,
)
from .timers import (
    REFRESH_RATIO,
    Deadlines,
    initial_bindack_timeout,
    mn_binding_expiry,
    nat_keepalive_interval,
    next_bindack_timeout,
    rate_limited_send_time,
    refresh_deadline,
)

IPv4Address = ipaddress.IPv4Address
IPv6Address = ipaddress.IPv6Address
IPv6Network = ipaddress.IPv6Network

#: BUs in total with an IPv6 CoA before a dual-stack MN tries its IPv4 CoA (RFC 5555 4.4.1).
IPV6_COA_ATTEMPTS = 3

# --- the state machine ---------------------------------------------------------------------------


class MnState(Enum):
    HOME = "home"  # on the home link, no binding (believed) at the HA
    REGISTERING = "registering"  # BU outstanding, no live binding at the HA (first registration)
    BOUND = "bound"  # acknowledged binding; refresh and expiry timers armed
    REFRESHING = "refreshing"  # BU outstanding while a binding lives at the HA (refresh or new CoA)
    DEREGISTERING = "deregistering"  # back home, de-registration BU outstanding
    FAILED = "failed"  # the HA rejected the BU: no more BUs until the next movement (11.7.3)


class MnInput(Enum):
    MOVED_AWAY = "moved-away"  # a new care-of address (or a retry from FAILED)
    MOVED_HOME = "moved-home"
    BA_ACCEPTED = "ba-accepted"  # status < 128, Sequence of the outstanding BU
    BA_REJECTED = "ba-rejected"  # status >= 128 that cannot be corrected
    BA_RETRY = "ba-retry"  # 135 (resync) or a refused F flag (RFC 5555 4.4.2): resend now
    BACKOFF_TIMEOUT = "backoff-timeout"  # no BA in time: retransmit
    REFRESH_DUE = "refresh-due"
    BINDING_EXPIRED = "binding-expired"  # the granted lifetime ran out while refreshing
    BRR_RECEIVED = "brr-received"  # Binding Refresh Request (11.7.4)
    BINDING_LOST = "binding-lost"  # Binding Error status 1 from the HA (11.3.6)


_S, _I = MnState, MnInput


def _row(state: MnState, pairs: dict[MnInput, tuple[MnState, ...]]) -> dict:
    return {(state, event): frozenset(targets) for event, targets in pairs.items()}


#: (state, input) -> the states the machine may go to. A pair not listed raises MnTransitionError
#: and leaves the state unchanged. Where two targets are listed the choice depends on whether a
#: binding is known to live at the HA (REFRESHING) or not (REGISTERING), or, for a rejected
#: de-registration, on the status (133 -> HOME, else FAILED).
MN_TRANSITIONS: dict[tuple[MnState, MnInput], frozenset[MnState]] = {
    **_row(_S.HOME, {_I.MOVED_AWAY: (_S.REGISTERING,), _I.MOVED_HOME: (_S.HOME,)}),
    **_row(
        _S.REGISTERING,
        {
            _I.MOVED_AWAY: (_S.REGISTERING,),
            _I.MOVED_HOME: (_S.DEREGISTERING,),
            _I.BA_ACCEPTED: (_S.BOUND,),
            _I.BA_REJECTED: (_S.FAILED,),
            _I.BA_RETRY: (_S.REGISTERING,),
            _I.BACKOFF_TIMEOUT: (_S.REGISTERING,),
            _I.BRR_RECEIVED: (_S.REGISTERING,),
            _I.BINDING_LOST: (_S.REGISTERING,),
        },
    ),
    **_row(
        _S.BOUND,
        {
            _I.MOVED_AWAY: (_S.REFRESHING,),
            _I.MOVED_HOME: (_S.DEREGISTERING,),
            _I.REFRESH_DUE: (_S.REFRESHING,),
            _I.BRR_RECEIVED: (_S.REFRESHING,),
            _I.BINDING_LOST: (_S.REGISTERING,),
        },
    ),
    **_row(
        _S.REFRESHING,
        {
            _I.MOVED_AWAY: (_S.REFRESHING,),
            _I.MOVED_HOME: (_S.DEREGISTERING,),
            _I.BA_ACCEPTED: (_S.BOUND,),
            _I.BA_REJECTED: (_S.FAILED,),
            _I.BA_RETRY: (_S.REFRESHING,),
            _I.BACKOFF_TIMEOUT: (_S.REFRESHING,),
            _I.BINDING_EXPIRED: (_S.REGISTERING,),
            _I.BRR_RECEIVED: (_S.REFRESHING,),
            _I.BINDING_LOST: (_S.REGISTERING,),
        },
    ),
    **_row(
        _S.DEREGISTERING,
        {
            _I.MOVED_AWAY: (_S.REGISTERING, _S.REFRESHING),
            _I.MOVED_HOME: (_S.DEREGISTERING,),
            _I.BA_ACCEPTED: (_S.HOME,),
            _I.BA_REJECTED: (_S.HOME, _S.FAILED),
            _I.BA_RETRY: (_S.DEREGISTERING,),
            _I.BACKOFF_TIMEOUT: (_S.DEREGISTERING,),
            _I.BRR_RECEIVED: (_S.DEREGISTERING,),
            _I.BINDING_LOST: (_S.DEREGISTERING,),
        },
    ),
    **_row(
        _S.FAILED,
        {
            _I.MOVED_AWAY: (_S.REGISTERING, _S.REFRESHING),
            _I.MOVED_HOME: (_S.DEREGISTERING,),
            _I.BRR_RECEIVED: (_S.FAILED,),
            _I.BINDING_LOST: (_S.FAILED,),
        },
    ),
}

#: States in which a BU is outstanding (a SEND timer is armed).
SENDING_STATES = frozenset({MnState.REGISTERING, MnState.REFRESHING, MnState.DEREGISTERING})


class MnTransitionError(MobilityError):
    """The BUL was asked for a transition its table does not list (a bug, never bad input)."""


def mn_transition(state: MnState, event: MnInput, target: MnState) -> MnState:
    """Check ``state --event--> target`` against MN_TRANSITIONS; return ``target``."""
    allowed = MN_TRANSITIONS.get((state, event))
    if allowed is None or target not in allowed:
        raise MnTransitionError(f"BUL: no transition {state.name} -{event.name}-> {target.name}")
    return target


# --- configuration and outputs -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MobileNodeConfig:
    """Mobile node settings. ``lifetime``: requested binding lifetime in seconds (sent in 4 s
    units). ``home_prefix``: a CoA inside it also means "at home" (11.5.2). ``key_mgmt_mobility``
    / ``link_local_compat``: the K and L bits (11.7.1; both off with manual keys and RFC 4941 HoAs).

    DSMIPv6 (RFC 5555): ``ha_ipv4`` the HA's IPv4 address (needed for an IPv4 CoA); ``ipv4_hoa``
    the IPv4 home address to ask for (None: none, 0.0.0.0: dynamic); ``force_udp`` the F flag
    from IPv4 CoAs; ``nat_keepalive`` the NAT refresh period when the HA gives none (NATKATIMEOUT).
    """

    hoa: IPv6Address
    ha: IPv6Address
    lifetime: float = 600.0
    home_prefix: IPv6Network | None = None
    key_mgmt_mobility: bool = False
    link_local_compat: bool = False
    first_reg_timeout: float = DEFAULT_INITIAL_BINDACK_TIMEOUT_FIRST_REG
    refresh_ratio: float = REFRESH_RATIO
    ha_ipv4: IPv4Address | None = None
    ipv4_hoa: IPv4Address | None = None
    force_udp: bool = False
    nat_keepalive: float = NATKATIMEOUT

    def __post_init__(self) -> None:
        object.__setattr__(self, "hoa", IPv6Address(self.hoa))
        object.__setattr__(self, "ha", IPv6Address(self.ha))
        if self.home_prefix is not None:
            object.__setattr__(self, "home_prefix", IPv6Network(self.home_prefix))
        if self.ha_ipv4 is not None:
            object.__setattr__(self, "ha_ipv4", IPv4Address(self.ha_ipv4))
        if self.ipv4_hoa is not None:
            object.__setattr__(self, "ipv4_hoa", IPv4Address(self.ipv4_hoa))


@dataclass(frozen=True, slots=True)
class OutgoingBindingUpdate:
    """A BU to send. ``src`` is the address the packet leaves from: with an IPv6 CoA the IPv6
    source is ``src`` (the CoA) and a Home Address option carries ``hoa`` (``home_address_option``);
    a de-registration leaves from the HoA without one (11.5.5). ``udp_to`` (DSMIPv6): wrap the IPv6
    packet (source ``hoa``) in UDP/IPv4 from ``src`` (the IPv4 CoA) to ``udp_to``:4191 (RFC 5555
    4.4.2). ``push()`` encodes the MH with the right pseudo-header (``hoa`` -> ``ha``)."""

    bu: BindingUpdate
    hoa: IPv6Address
    ha: IPv6Address
    src: CareOfAddress
    home_address_option: bool
    udp_to: IPv4Address | None = None

    def push(self) -> bytes:
        return push_mh(self.bu, self.hoa, self.ha)


@dataclass(frozen=True, slots=True)
class HomeBinding:
    """The MN's view of its acknowledged home registration (the BUL entry, 11.1): what the tunnel
    uses for data. Times are absolute."""

    coa: CareOfAddress
    lifetime: int  # seconds granted (BA Lifetime * 4)
    sent_at: float  # when the acknowledged BU was sent (11.7.3 counts from here)
    expires: float
    refresh_at: float
    udp_encap: bool = False  # RFC 5555: tunnel data in UDP/IPv4
    nat_detected: bool = False
    keepalive: float | None = None  # NAT refresh period in use
    ipv4_hoa: IPv4Address | None = None


# --- events --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StateChanged:
    old: MnState
    new: MnState
    input: MnInput


@dataclass(frozen=True, slots=True)
class Registered:
    """The HA accepted a binding for a new care-of address (or new encapsulation): move the data
    tunnel to ``coa`` now (RFC 5555 / draft Req #3: data switches when the BA arrives)."""

    coa: CareOfAddress
    lifetime: int
    previous_coa: CareOfAddress | None = None
    udp_encap: bool = False
    nat_detected: bool = False
    ipv4_hoa: IPv4Address | None = None


@dataclass(frozen=True, slots=True)
class BindingRefreshed:
    coa: CareOfAddress
    lifetime: int


@dataclass(frozen=True, slots=True)
class RegistrationFailed:
    """The HA rejected the BU (status >= 128): no binding to rely on; no BUs until the next
    movement (11.7.3). 134 means the HoA must never be used again (11.7.1)."""

    status: int
    coa: CareOfAddress | None


@dataclass(frozen=True, slots=True)
class ReturnedHome:
    """The de-registration was acknowledged (or the HA had no binding, 133): tear the tunnel
    down, use the HoA on the home link, multicast unsolicited NAs (11.5.5)."""

    hoa: IPv6Address


@dataclass(frozen=True, slots=True)
class BindingAckTimeout:
    """No BA for ``seq``: retransmitting (attempt ``attempt``), next timeout ``timeout`` s."""

    seq: int
    attempt: int
    timeout: float


@dataclass(frozen=True, slots=True)
class BindingExpired:
    """The granted lifetime ran out before a refresh was acknowledged: the HA no longer tunnels."""

    coa: CareOfAddress


@dataclass(frozen=True, slots=True)
class BindingLost:
    """The HA reported it has no binding (Binding Error status 1, 11.3.6): registering again."""

    coa: CareOfAddress | None


@dataclass(frozen=True, slots=True)
class SequenceResynchronized:
    """Status 135: the HA's last accepted sequence number; the next BU uses ``seq + 1``."""

    seq: int


@dataclass(frozen=True, slots=True)
class PrefixDiscoveryNeeded:
    """Status 1: send a Mobile Prefix Solicitation (11.7.3)."""


@dataclass(frozen=True, slots=True)
class Ipv4HomeAddressAssigned:
    ipv4_hoa: IPv4Address
    prefix_len: int


@dataclass(frozen=True, slots=True)
class Ipv4HomeAddressRefused:
    status: int


@dataclass(frozen=True, slots=True)
class CareOfAddressFallback:
    """The IPv6 CoA went unanswered: registering the IPv4 CoA of the same network instead
    (RFC 5555 4.4.1)."""

    old: IPv6Address
    new: IPv4Address


@dataclass(frozen=True, slots=True)
class UdpEncapsulationRefused:
    """The HA refused a BU with the F flag (RFC 5555 4.4.2): resending without F."""

    status: int


class IgnoreReason(Enum):
    NO_OUTSTANDING_BU = "no-outstanding-bu"  # BA while no BU is outstanding (11.7.3)
    SEQ_MISMATCH = "seq-mismatch"  # BA for another Sequence (11.7.3)
    NO_BINDING = "no-binding"  # BRR / BE with no Binding Update List entry (11.7.4, 11.3.6)
    OTHER_HOME_ADDRESS = "other-home-address"  # BE for a HoA that is not ours
    UNHANDLED_STATUS = "unhandled-status"  # BE status 2: we use no extension to cease (11.3.6)
    NOT_NEEDED = "not-needed"  # BRR / BE while a BU is outstanding or after a rejection


@dataclass(frozen=True, slots=True)
class MessageIgnored:
    message: str  # "BA", "BRR", "BE"
    reason: IgnoreReason


MnEvent = Union[
    StateChanged,
    Registered,
    BindingRefreshed,
    RegistrationFailed,
    ReturnedHome,
    BindingAckTimeout,
    BindingExpired,
    BindingLost,
    SequenceResynchronized,
    PrefixDiscoveryNeeded,
    Ipv4HomeAddressAssigned,
    Ipv4HomeAddressRefused,
    UdpEncapsulationRefused,
    CareOfAddressFallback,
    MessageIgnored,
]


class MnResult(NamedTuple):
    """What every input returns: BUs to send now and events, in order."""

    messages: list[OutgoingBindingUpdate]
    events: list[MnEvent]


class _Outstanding(NamedTuple):
    """The latest BU sent (the only one a BA may acknowledge, 11.7.3)."""

    bu: BindingUpdate
    sent_at: float
    coa: CareOfAddress  # the HoA for a de-registration

    @property
    def deregistration(self) -> bool:
        return self.bu.lifetime == 0


class _Timer(Enum):
    SEND = "send"  # retransmission, or a first transmission delayed by the rate limit
    REFRESH = "refresh"
    EXPIRY = "expiry"


# --- the Binding Update List ---------------------------------------------------------------------


class BindingUpdateList:
    """Home registration with one home agent (RFC 6275 11.7.1, 11.7.3, 11.5.5, 11.8)."""

    def __init__(self, config: MobileNodeConfig, *, rand: Callable[[int], bytes]) -> None:
        self.config = config
        self._state = MnState.HOME
        self._next_seq = int.from_bytes(rand(2), "big")  # 11.7.1: "may start at any value"
        self._coa: CareOfAddress | None = None  # where we are (None: home)
        self._coa_valid_until: float | None = None
        self._fallback_coa: IPv4Address | None = None  # RFC 5555 4.4.1: IPv4 CoA to try next
        self._prefer_ipv4 = False  # the IPv6 CoA went unanswered: stay with IPv4 on later moves
        self._outstanding: _Outstanding | None = None
        self._pending = False  # a first transmission waits for the rate limit
        self._timeout = 0.0
        self._attempt = 0
        self._recent_sends: deque[float] = deque(maxlen=MAX_UPDATE_RATE)
        self._binding: HomeBinding | None = None
        self._ha_expires: float | None = None  # when the HA's binding (as we know it) ends
        self._ipv4_hoa = config.ipv4_hoa
        self._force_udp = config.force_udp
        self._timers: Deadlines[_Timer] = Deadlines()

    # -- queries ---------------------------------------------------------------------------------

    @property
    def state(self) -> MnState:
        return self._state

    @property
    def coa(self) -> CareOfAddress | None:
        """The care-of address being registered (None at home)."""
        return self._coa

    @property
    def binding(self) -> HomeBinding | None:
        """The acknowledged binding the data path uses (None when there is none)."""
        return self._binding

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def outstanding(self) -> BindingUpdate | None:
        return self._outstanding.bu if self._outstanding is not None else None

    def is_home(self, addr: CareOfAddress) -> bool:
        """Home link detection (11.5.2): the address is the HoA or on the home prefix."""
        if addr == self.config.hoa:
            return True
        prefix = self.config.home_prefix
        return isinstance(addr, IPv6Address) and prefix is not None and addr in prefix

    def next_timer(self) -> float | None:
        return self._timers.next()

    # -- inputs ----------------------------------------------------------------------------------

    def movement(
        self,
        coa: CareOfAddress | str,
        now: float,
        *,
        coa_valid_until: float | None = None,
        ipv4_coa: IPv4Address | str | None = None,
    ) -> MnResult:
        """The MN now has primary care-of address ``coa`` (11.5.1); ``coa == hoa`` (or an address
        on the home prefix) means it is back on the home link (11.5.5). An IPv4 address is a CoA
        in an IPv4-only network (RFC 5555). ``ipv4_coa``: a dual-stack visited network also gave
        an IPv4 CoA; the IPv6 one is tried first and the IPv4 one after IPV6_COA_ATTEMPTS
        unanswered BUs, and that family is kept on later moves (RFC 5555 4.4.1). Moving to the CoA
        already in use is a no-op except after a rejection (FAILED), where it retries."""
        coa = ipaddress.ip_address(coa)
        out = MnResult([], [])
        if self.is_home(coa):
            self._move_home(now, out)
            return out
        fallback = IPv4Address(ipv4_coa) if ipv4_coa is not None and isinstance(coa, IPv6Address) else None
        if fallback is not None and self._prefer_ipv4:
            coa, fallback, coa_valid_until = fallback, None, None
        if isinstance(coa if fallback is None else fallback, IPv4Address) and self.config.ha_ipv4 is None:
            raise MobilityError("an IPv4 care-of address needs MobileNodeConfig.ha_ipv4 (RFC 5555)")
        self._fallback_coa = fallback
        if coa != self._coa or self._state is MnState.FAILED:
            self._move_away(coa, coa_valid_until, now, out)
        return out

    def handle_binding_ack(self, ba: BindingAck, now: float) -> MnResult:
        """A BA from the HA, already authenticated by ESP (11.7.3)."""
        out = MnResult([], [])
        outstanding = self._outstanding
        if outstanding is None or self._state not in SENDING_STATES:
            out.events.append(MessageIgnored("BA", IgnoreReason.NO_OUTSTANDING_BU))
        elif ba.status == BaStatus.SEQ_OUT_OF_WINDOW:
            self._resync(ba, now, out)
        elif ba.seq != outstanding.bu.seq:
            out.events.append(MessageIgnored("BA", IgnoreReason.SEQ_MISMATCH))
        elif ba.accepted:
            self._accepted(ba, outstanding, now, out)
        else:
            self._rejected(ba, outstanding, now, out)
        return out

    def handle_binding_refresh_request(self, now: float) -> MnResult:
        """A BRR from the HA (11.7.4, 9.5.5): refresh now if bound; ignored otherwise."""
        out = MnResult([], [])
        if self._state is MnState.HOME:
            out.events.append(MessageIgnored("BRR", IgnoreReason.NO_BINDING))
        elif self._state is MnState.BOUND:
            self._go(MnInput.BRR_RECEIVED, MnState.REFRESHING, out)
            self._start_attempt(now, out)
        else:
            self._go(MnInput.BRR_RECEIVED, self._state, out)
            out.events.append(MessageIgnored("BRR", IgnoreReason.NOT_NEEDED))
        return out

    def handle_binding_error(self, be: BindingErrorMessage, now: float) -> MnResult:
        """A Binding Error from the HA (11.3.6): status 1 means the HA has no binding for our HoA
        (e.g. it restarted): register again, as a first registration."""
        out = MnResult([], [])
        if self._state is MnState.HOME:
            out.events.append(MessageIgnored("BE", IgnoreReason.NO_BINDING))
        elif be.home_address != self.config.hoa:
            out.events.append(MessageIgnored("BE", IgnoreReason.OTHER_HOME_ADDRESS))
        elif be.status != BeStatus.UNKNOWN_BINDING_HAO:
            out.events.append(MessageIgnored("BE", IgnoreReason.UNHANDLED_STATUS))
        elif self._state in (MnState.BOUND, MnState.REFRESHING):
            self._go(MnInput.BINDING_LOST, MnState.REGISTERING, out)
            out.events.append(BindingLost(self._coa))
            self._forget_binding()
            self._start_attempt(now, out)
        else:
            self._go(MnInput.BINDING_LOST, self._state, out)
            out.events.append(MessageIgnored("BE", IgnoreReason.NOT_NEEDED))
        return out

    def handle_timer(self, now: float) -> MnResult:
        """Run every timer due at ``now`` (retransmission, refresh, expiry), earliest first."""
        out = MnResult([], [])
        while (due := self._timers.pop_due(now)) is not None:
            if due is _Timer.SEND:
                self._send_timer(now, out)
            elif due is _Timer.REFRESH:
                self._go(MnInput.REFRESH_DUE, MnState.REFRESHING, out)
                self._start_attempt(now, out)
            else:
                self._expired(out)
        return out

    # -- movement --------------------------------------------------------------------------------

    def _move_home(self, now: float, out: MnResult) -> None:
        if self._state is MnState.HOME:
            self._go(MnInput.MOVED_HOME, MnState.HOME, out)
            return
        was_deregistering = self._state is MnState.DEREGISTERING
        self._go(MnInput.MOVED_HOME, MnState.DEREGISTERING, out)
        self._coa, self._coa_valid_until, self._fallback_coa = None, None, None
        if not was_deregistering:
            self._start_attempt(now, out)

    def _move_away(self, coa: CareOfAddress, valid_until: float | None, now: float, out: MnResult) -> None:
        self._go(MnInput.MOVED_AWAY, self._away_state(now), out)
        self._coa, self._coa_valid_until = coa, valid_until
        self._start_attempt(now, out)

    def _away_state(self, now: float) -> MnState:
        """REFRESHING when a binding lives at the HA, else REGISTERING. From BOUND and REFRESHING
        the answer is always REFRESHING: only the EXPIRY timer ends a binding (it fires at the
        next ``handle_timer`` even if its deadline has already passed)."""
        if self._state in (MnState.BOUND, MnState.REFRESHING):
            return MnState.REFRESHING
        if self._state in (MnState.DEREGISTERING, MnState.FAILED) and self._binding_alive(now):
            return MnState.REFRESHING
        return MnState.REGISTERING

    # -- Binding Acknowledgements (11.7.3) -----------------------------------------------------

    def _accepted(self, ba: BindingAck, sent: _Outstanding, now: float, out: MnResult) -> None:
        if sent.deregistration:
            self._go(MnInput.BA_ACCEPTED, MnState.HOME, out)
            self._forget_binding()
            out.events.append(ReturnedHome(self.config.hoa))
            return
        self._go(MnInput.BA_ACCEPTED, MnState.BOUND, out)
        previous = self._binding
        binding = self._new_binding(ba, sent)
        self._fallback_coa = None
        if isinstance(binding.coa, IPv6Address):
            self._prefer_ipv4 = False  # IPv6 works (again): prefer it on the next move
        self._binding, self._ha_expires = binding, binding.expires
        self._outstanding = None
        self._arm_bound_timers(binding)
        if ba.status == BaStatus.ACCEPTED_PREFIX_DISCOVERY:
            out.events.append(PrefixDiscoveryNeeded())
        self._ipv4_ack(ba, previous, out)
        if previous is not None and (previous.coa, previous.udp_encap) == (binding.coa, binding.udp_encap):
            out.events.append(BindingRefreshed(binding.coa, binding.lifetime))
        else:
            out.events.append(
                Registered(
                    binding.coa,
                    binding.lifetime,
                    previous.coa if previous is not None else None,
                    binding.udp_encap,
                    binding.nat_detected,
                    binding.ipv4_hoa,
                )
            )

    def _new_binding(self, ba: BindingAck, sent: _Outstanding) -> HomeBinding:
        """The BUL entry after an accepted BA: lifetime counted from the BU's send time (11.7.3),
        refresh per timers.refresh_deadline, NAT state per RFC 5555 4.4.2 (docs/binding.md)."""
        lifetime = ba.lifetime_seconds
        advice = find_option(ba.options, BindingRefreshAdvice)
        if advice is not None and not advice.refresh_interval < ba.lifetime:
            advice = None  # RFC 6275 10.3.1: MUST be less than the Lifetime; ignore it otherwise
        nat = find_option(ba.options, NatDetection)
        nat_detected = nat is not None and nat.refresh_time != NAT_REFRESH_NOT_NEEDED
        udp_encap = nat is not None and (nat_detected or nat.f)
        refresh_time = nat.refresh_time if nat is not None and nat_detected else None
        keepalive = nat_keepalive_interval(refresh_time, self.config.nat_keepalive)
        refresh_at = refresh_deadline(
            sent.sent_at,
            lifetime,
            advice=advice.refresh_seconds if advice is not None else None,
            nat_keepalive=keepalive,
            ratio=self.config.refresh_ratio,
        )
        ack = find_option(ba.options, Ipv4AddressAck)
        return HomeBinding(
            coa=sent.coa,
            lifetime=lifetime,
            sent_at=sent.sent_at,
            expires=mn_binding_expiry(sent.sent_at, lifetime),
            refresh_at=refresh_at,
            udp_encap=udp_encap,
            nat_detected=nat_detected,
            keepalive=keepalive,
            ipv4_hoa=ack.hoa if ack is not None and ack.success else None,
        )

    def _ipv4_ack(self, ba: BindingAck, previous: HomeBinding | None, out: MnResult) -> None:
        """IPv4 Address Acknowledgement (RFC 5555 4.4.2): success -> the IPv4 HoA is bound too and
        later BUs ask for that address; failure or no option -> IPv6 binding only."""
        ack = find_option(ba.options, Ipv4AddressAck)
        if ack is None:
            return
        if not ack.success:
            out.events.append(Ipv4HomeAddressRefused(int(ack.status)))
            return
        self._ipv4_hoa = ack.hoa
        if previous is None or previous.ipv4_hoa != ack.hoa:
            out.events.append(Ipv4HomeAddressAssigned(ack.hoa, ack.prefix_len))

    def _rejected(self, ba: BindingAck, sent: _Outstanding, now: float, out: MnResult) -> None:
        if sent.deregistration:
            home = ba.status == BaStatus.NOT_HOME_AGENT  # no binding left at the HA: fine
            self._go(MnInput.BA_REJECTED, MnState.HOME if home else MnState.FAILED, out)
            self._forget_binding()
            failed = RegistrationFailed(int(ba.status), None)
            out.events.append(ReturnedHome(self.config.hoa) if home else failed)
            return
        if sent.bu.force_udp:  # RFC 5555 4.4.2: "MAY resend the binding update without the F flag"
            self._go(MnInput.BA_RETRY, self._state, out)
            self._force_udp = False
            out.events.append(UdpEncapsulationRefused(int(ba.status)))
            self._send_or_schedule(now, out)
            return
        self._go(MnInput.BA_REJECTED, MnState.FAILED, out)
        self._forget_binding(keep_ha_expiry=True)  # a rejection leaves the HA's binding as it was
        out.events.append(RegistrationFailed(int(ba.status), sent.coa))

    def _resync(self, ba: BindingAck, now: float, out: MnResult) -> None:
        """Status 135 (11.7.1, 11.7.3): adopt the HA's last accepted number, resend with the next."""
        self._go(MnInput.BA_RETRY, self._state, out)
        self._next_seq = seq_next(ba.seq)
        out.events.append(SequenceResynchronized(ba.seq))
        self._send_or_schedule(now, out)

    # -- sending and back-off (11.8) ------------------------------------------------------------

    def _start_attempt(self, now: float, out: MnResult) -> None:
        """A new BU (new CoA, refresh, de-registration): back-off starts again (11.8)."""
        self._timeout = initial_bindack_timeout(not self._binding_alive(now), self.config.first_reg_timeout)
        self._attempt = 0
        self._set_state_timers()
        self._send_or_schedule(now, out)

    def _send_or_schedule(self, now: float, out: MnResult) -> None:
        when = rate_limited_send_time(self._recent_sends, now)
        if when <= now:
            self._transmit(now, out)
        else:  # over MAX_UPDATE_RATE: the next BU waits; nothing is outstanding until it leaves
            self._outstanding, self._pending = None, True
            self._timers.arm(_Timer.SEND, when)

    def _send_timer(self, now: float, out: MnResult) -> None:
        if self._pending:
            self._send_or_schedule(now, out)
            return
        self._go(MnInput.BACKOFF_TIMEOUT, self._state, out)
        last_seq = self._outstanding.bu.seq if self._outstanding is not None else self._next_seq
        self._timeout = next_bindack_timeout(self._timeout)
        out.events.append(BindingAckTimeout(last_seq, self._attempt, self._timeout))
        if self._fallback_coa is not None and self._attempt >= IPV6_COA_ATTEMPTS:
            self._fall_back_to_ipv4(now, out)
            return
        self._send_or_schedule(now, out)

    def _fall_back_to_ipv4(self, now: float, out: MnResult) -> None:
        """RFC 5555 4.4.1: after three BUs in total with the IPv6 CoA went unanswered, bind the
        IPv4 CoA instead, with a fresh back-off, and keep that family on later moves."""
        old, self._coa = self._coa, self._fallback_coa
        self._fallback_coa, self._coa_valid_until, self._prefer_ipv4 = None, None, True
        out.events.append(CareOfAddressFallback(old, self._coa))  # type: ignore[arg-type]
        self._timeout = initial_bindack_timeout(not self._binding_alive(now), self.config.first_reg_timeout)
        self._attempt = 0
        self._send_or_schedule(now, out)

    def _transmit(self, now: float, out: MnResult) -> None:
        message = self._build(self._next_seq, now)
        self._next_seq = seq_next(self._next_seq)  # 11.8: every transmission a larger number
        self._outstanding = _Outstanding(message.bu, now, message.src)
        self._pending = False
        self._attempt += 1
        self._recent_sends.append(now)
        self._timers.arm(_Timer.SEND, now + self._timeout)
        out.messages.append(message)

    def _build(self, seq: int, now: float) -> OutgoingBindingUpdate:
        """The BU for the current state (11.7.1; 11.5.5 at home; RFC 5555 4.4.2 from IPv4)."""
        cfg = self.config
        flags = BuFlag.A | BuFlag.H
        if cfg.key_mgmt_mobility:
            flags |= BuFlag.K
        if cfg.link_local_compat:
            flags |= BuFlag.L
        coa = self._coa
        if coa is None:  # de-registration from the home link: CoA = HoA, Lifetime 0, no HAO
            bu = BindingUpdate(seq, flags, 0, (AlternateCareOfAddress(cfg.hoa),))
            return OutgoingBindingUpdate(bu, cfg.hoa, cfg.ha, cfg.hoa, False)
        options: list[MobilityOption] = []
        if isinstance(coa, IPv4Address):
            options.append(Ipv4CareOfAddress(coa))
            if self._force_udp:
                flags |= BuFlag.F
        else:
            options.append(AlternateCareOfAddress(coa))  # mandatory with ESP (11.7.1)
        if self._ipv4_hoa is not None:
            options.append(Ipv4HomeAddress(self._ipv4_hoa))
        bu = BindingUpdate(seq, flags, self._requested_lifetime(now), tuple(options))
        if isinstance(coa, IPv4Address):
            return OutgoingBindingUpdate(bu, cfg.hoa, cfg.ha, coa, False, cfg.ha_ipv4)
        return OutgoingBindingUpdate(bu, cfg.hoa, cfg.ha, coa, True)

    def _requested_lifetime(self, now: float) -> int:
        """Configured lifetime, <= the CoA's remaining valid lifetime (11.7.1), never 0 (which
        would delete the binding)."""
        seconds = self.config.lifetime
        if self._coa_valid_until is not None:
            seconds = min(seconds, self._coa_valid_until - now)
        return max(1, lifetime_units(seconds))

    # -- timers ----------------------------------------------------------------------------------

    def _expired(self, out: MnResult) -> None:
        coa = self._binding.coa if self._binding is not None else self._coa
        self._go(MnInput.BINDING_EXPIRED, MnState.REGISTERING, out)
        self._forget_binding()
        out.events.append(BindingExpired(coa))  # type: ignore[arg-type]

    def _binding_alive(self, now: float) -> bool:
        return self._ha_expires is not None and now < self._ha_expires

    def _forget_binding(self, keep_ha_expiry: bool = False) -> None:
        self._binding = None
        if not keep_ha_expiry:
            self._ha_expires = None
        self._set_state_timers()

    def _arm_bound_timers(self, binding: HomeBinding) -> None:
        self._timers.cancel(_Timer.SEND)
        self._timers.arm(_Timer.REFRESH, binding.refresh_at)  # armed first: runs first on a tie
        self._timers.arm(_Timer.EXPIRY, binding.expires)

    def _set_state_timers(self) -> None:
        """Timers each state keeps: SEND only while sending, REFRESH only when BOUND, EXPIRY while
        BOUND or REFRESHING (the binding may run out under a refresh), none otherwise."""
        state = self._state
        if state not in SENDING_STATES:
            self._timers.cancel(_Timer.SEND)
            self._outstanding, self._pending = None, False
        if state is not MnState.BOUND:
            self._timers.cancel(_Timer.REFRESH)
        if state is MnState.REFRESHING and self._ha_expires is not None:
            self._timers.arm(_Timer.EXPIRY, self._ha_expires)
        elif state is not MnState.BOUND:
            self._timers.cancel(_Timer.EXPIRY)

    def _go(self, event: MnInput, target: MnState, out: MnResult) -> None:
        """Take a transition of MN_TRANSITIONS (raises, state unchanged, if it is not listed)."""
        old = self._state
        self._state = mn_transition(old, event, target)
        if target is not old:
            out.events.append(StateChanged(old, target, event))
