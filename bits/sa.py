"""Security Association parameters (RFC 4301 section 4.4.2): identity, keys and limits.

``SaParams`` is frozen: it is what configuration says. Everything that changes per packet (sequence
counter, replay window, lifetime usage, statistics) lives in the SA's mutable state object in
``bits/esp.py``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from .constants import DEFAULT_REPLAY_WINDOW, AuthAlg, Direction, EncAlg, Mode

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Lifetime:
    """One lifetime limit set (RFC 4301 section 4.4.2.1). ``None`` means no limit."""

    bytes: int | None = None
    packets: int | None = None
    seconds: float | None = None

    def is_unlimited(self) -> bool:
        return self.bytes is None and self.packets is None and self.seconds is None


@dataclass(frozen=True, slots=True)
class SaParams:
    """A manually keyed ESP SA as ``setkey add`` describes it.

    ``src``/``dst`` are the SA's source and destination: the outer header in tunnel mode, the
    packet's own addresses in transport mode. ``direction`` is this node's view (OUT: we send).
    """

    spi: int
    src: IPAddress
    dst: IPAddress
    direction: Direction
    mode: Mode
    enc: EncAlg
    enc_key: bytes = field(repr=False)
    auth: AuthAlg = AuthAlg.NONE
    auth_key: bytes = field(default=b"", repr=False)
    esn: bool = False
    replay_window: int = DEFAULT_REPLAY_WINDOW  # 0 disables anti-replay
    soft: Lifetime = Lifetime()
    hard: Lifetime = Lifetime()
    reqid: int | None = None  # setkey "-u", ties SAs to "unique:N" policies
