"""Every mobility timer in one place: absolute deadlines and the formulas that set them.

Sans-I/O: times are monotonic seconds passed in as ``now``; nothing here reads a clock. The state
machines (``mobility.binding.BindingCache`` on the HA, ``mobility.bul.BindingUpdateList`` on the MN)
keep their deadlines in a ``Deadlines`` table, expose the earliest as ``next_timer()`` and act on
``handle_timer(now)``. The adapter sleeps until ``next_timer()`` and calls ``handle_timer``.

Timers and their formulas (WireGuard ``timers.c`` style; t_sent = time the BU was sent,
L = lifetime in seconds, constants from RFC 6275 section 12 / ``mobility.constants``):

Mobile node (RFC 6275 section 11), one set per home registration:

  SEND / retransmit  t_sent + T, T_0 = InitialBindackTimeoutFirstReg (1.5 s) when the MN has no
                     binding at the HA, else INITIAL_BINDACK_TIMEOUT (1 s) (11.8);
                     T_(n+1) = min(2 T_n, MAX_BINDACK_TIMEOUT (32 s)) (11.8, 11.7.1: keep sending
                     every 32 s until acknowledged). Rate limit: never more than MAX_UPDATE_RATE (3)
                     BUs in any one second (11.8): the 4th waits until 1 s after the 3rd-last.
  REFRESH            t_sent + min(REFRESH_RATIO * L_ack, refresh advice (6.2.4, 11.7.3),
                     NAT keepalive (RFC 5555 4.3: the NAT Detection refresh time, or
                     NATKATIMEOUT = 110 s when that field is 0, only while a NAT is detected)).
  EXPIRY             t_sent + L_ack: RFC 6275 11.7.3 counts the granted lifetime down from the
                     time the BU was sent, L_remain - (L_update - L_ack).

Home agent (RFC 6275 section 10), one set per Binding Cache entry:

  EXPIRY             t_accept + L_granted, L_granted = 4 s * min(BU Lifetime, HA maximum,
                     remaining valid lifetime of the home prefix in 4 s units) (10.3.1).
  PURGE              t_dereg + MAX_DELETE_BCE_TIMEOUT (10 s): a de-registered entry stays, marked
                     invalid, so that a delayed older BU still gets status 135 (10.3.2).
  BRR                t_expiry - BRR lead (configurable, off by default): a Binding Refresh Request
                     to an MN whose binding is about to expire (9.5.5, MAY).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar

from .constants import (
    INITIAL_BINDACK_TIMEOUT,
    LIFETIME_UNIT,
    MAX_BINDACK_TIMEOUT,
    MAX_DELETE_BCE_TIMEOUT,
    MAX_UPDATE_RATE,
    NAT_REFRESH_IGNORE,
    NAT_REFRESH_NOT_NEEDED,
    NATKATIMEOUT,
)

# --- Implementation ------------------------------------------------------------------------------

#: Fraction of the granted lifetime after which the MN refreshes its home registration. RFC 6275
#: 11.7.1/11.7.3 only say "well before the expiration"; 0.8 leaves 20% of the lifetime for the
#: retransmissions of the refresh (at least 1 + 2 + 4 s of back-off for a 60 s lifetime).
REFRESH_RATIO = 0.8
RATE_WINDOW = 1.0  # seconds: MAX_UPDATE_RATE messages of one type per second (RFC 6275 11.8)

K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    """Absolute deadlines keyed by timer name (a heap with lazy deletion).

    ``arm`` replaces a key's deadline, ``cancel`` forgets it, ``next()`` is the earliest deadline
    and ``pop_due(now)`` returns the earliest key whose deadline is <= now; ties go in the order
    of the latest ``arm`` calls (a re-armed key queues behind keys armed before it).
    """

    def __init__(self) -> None:
        self._at: dict[K, tuple[float, int]] = {}  # key -> (deadline, arming order) of its live item
        self._heap: list[tuple[float, int, K]] = []
        self._order = itertools.count()

    def arm(self, key: K, when: float) -> None:
        order = next(self._order)
        self._at[key] = (when, order)
        heapq.heappush(self._heap, (when, order, key))
        if len(self._heap) > 2 * len(self._at) + 16:
            self._compact()

    def cancel(self, key: K) -> None:
        self._at.pop(key, None)

    def get(self, key: K) -> float | None:
        live = self._at.get(key)
        return live[0] if live is not None else None

    def __contains__(self, key: object) -> bool:
        return key in self._at

    def __len__(self) -> int:
        return len(self._at)

    def next(self) -> float | None:
        self._prune()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> K | None:
        self._prune()
        if not self._heap or self._heap[0][0] > now:
            return None
        _when, _n, key = heapq.heappop(self._heap)
        del self._at[key]
        return key

    def _prune(self) -> None:
        heap = self._heap
        while heap and self._at.get(heap[0][2]) != heap[0][:2]:
            heapq.heappop(heap)  # a cancelled or re-armed item

    def _compact(self) -> None:
        self._heap = [(when, order, key) for key, (when, order) in self._at.items()]
        heapq.heapify(self._heap)


# --- mobile node formulas (RFC 6275 11.7.3, 11.8; RFC 5555 4.3) ----------------------------------


def initial_bindack_timeout(first_registration: bool, first_reg_timeout: float) -> float:
    """T_0 (RFC 6275 11.8): InitialBindackTimeoutFirstReg when the MN has no binding at the HA
    (the HA runs DAD before answering), INITIAL_BINDACK_TIMEOUT otherwise."""
    return first_reg_timeout if first_registration else INITIAL_BINDACK_TIMEOUT


def next_bindack_timeout(timeout: float) -> float:
    """T_(n+1) = min(2 T_n, MAX_BINDACK_TIMEOUT) (RFC 6275 11.8)."""
    return min(2.0 * timeout, MAX_BINDACK_TIMEOUT)


def rate_limited_send_time(recent_sends: Sequence[float], now: float) -> float:
    """Earliest time >= now at which one more BU keeps to MAX_UPDATE_RATE per second (RFC 6275
    11.8). ``recent_sends`` are the previous send times, oldest first."""
    if len(recent_sends) < MAX_UPDATE_RATE:
        return now
    return max(now, recent_sends[-MAX_UPDATE_RATE] + RATE_WINDOW)


def mn_binding_expiry(sent_at: float, lifetime_ack: float) -> float:
    """When the MN's view of its binding runs out: RFC 6275 11.7.3 counts the BA's lifetime down
    from the time the acknowledged BU was sent."""
    return sent_at + lifetime_ack


def nat_keepalive_interval(refresh_time: int | None, default: float = NATKATIMEOUT) -> float | None:
    """NAT binding refresh period from a NAT Detection option's refresh time (RFC 5555 3.2.2, 4.3):
    all ones = no keepalives needed (None), 0 = ignore the field and use NATKATIMEOUT."""
    if refresh_time is None or refresh_time == NAT_REFRESH_NOT_NEEDED:
        return None
    if refresh_time == NAT_REFRESH_IGNORE:
        return default
    return float(refresh_time)


def refresh_deadline(
    sent_at: float,
    lifetime_ack: float,
    *,
    advice: float | None = None,
    nat_keepalive: float | None = None,
    ratio: float = REFRESH_RATIO,
) -> float:
    """When the MN re-sends its home registration BU: the earliest of REFRESH_RATIO of the granted
    lifetime, the HA's Binding Refresh Advice (RFC 6275 11.7.3) and the NAT keepalive period
    (RFC 5555 4.3), counted from the time the acknowledged BU was sent."""
    interval = ratio * lifetime_ack
    if advice is not None and advice > 0:
        interval = min(interval, advice)
    if nat_keepalive is not None and nat_keepalive > 0:
        interval = min(interval, nat_keepalive)
    return sent_at + interval


# --- home agent formulas (RFC 6275 10.3.1, 10.3.2) -----------------------------------------------


def bce_expiry(now: float, lifetime_units: int) -> float:
    """Binding Cache entry expiry: the granted lifetime (4 s units) from acceptance (10.3.1)."""
    return now + lifetime_units * LIFETIME_UNIT


def bce_purge_deadline(now: float) -> float:
    """When a de-registered (invalid) entry is removed: MAX_DELETE_BCE_TIMEOUT later (10.3.2)."""
    return now + MAX_DELETE_BCE_TIMEOUT


def brr_deadline(expires: float, registered_at: float, lead: float | None) -> float | None:
    """When the HA sends a Binding Refresh Request (9.5.5, MAY): ``lead`` seconds before expiry,
    never before the registration itself; None when disabled."""
    if lead is None or lead <= 0:
        return None
    when = expires - lead
    return when if when > registered_at else None
