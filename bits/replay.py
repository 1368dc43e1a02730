"""Anti-replay window (RFC 4303 section 3.4.3) with ESN high-half inference (RFC 4303 Appendix A).

Check-then-commit, as strongSwan (``verify_seqno`` / ``set_authenticated_seqno``) and OpenBSD
(``checkreplaywindow(..., commit)``) do it:

1. ``check(seq)`` before the crypto, a cheap filter: too old or already seen -> drop.
2. The ICV / AEAD tag is verified.
3. ``commit(seq)`` only after it verified; a forged packet therefore never moves the window.

The window is a bit mask in a Python int: bit ``i`` stands for sequence number ``top - i``, so
bit 0 is the right edge ``top`` (T in the RFC), the highest authenticated sequence number.
Sequence numbers are full (64-bit with ESN) integers; ``infer`` rebuilds them from the 32 bits on
the wire.

Across restarts the SA persists ``top`` (``bits/esp.py``, ``bits/seqstore.py``) and a new window
starts with ``restore(top)``: every sequence number up to the persisted edge counts as seen.
"""

from __future__ import annotations

from enum import IntEnum

from .constants import MAX_REPLAY_WINDOW, MIN_REPLAY_WINDOW
from .errors import ConfigError

_MASK32 = 0xFFFFFFFF
_SEQ_SPACE = 1 << 32
#: Without anti-replay an ESN receiver still has to place SeqL in a 2^32 block; it then picks the
#: high half that puts the sequence number nearest the right edge (a half-space "window").
_INFER_WINDOW_DISABLED = 1 << 31


class ReplayCheck(IntEnum):
    OK = 0
    DUPLICATE = 1  # inside the window and already seen
    TOO_OLD = 2  # left of the window (or sequence number 0, which is never sent)


class ReplayWindow:
    """One inbound SA's window. ``size`` 0 disables anti-replay (``check`` always passes) but the
    right edge is still tracked for ESN inference."""

    __slots__ = ("size", "top", "bitmap", "_mask", "_infer_w")

    def __init__(self, size: int) -> None:
        if size != 0 and not MIN_REPLAY_WINDOW <= size <= MAX_REPLAY_WINDOW:
            raise ConfigError(
                f"replay window must be 0 (off) or {MIN_REPLAY_WINDOW}..{MAX_REPLAY_WINDOW}, "
                f"not {size}"
            )
        self.size = size
        self.top = 0  # T: highest authenticated sequence number (0: none yet)
        self.bitmap = 0
        self._mask = (1 << size) - 1
        self._infer_w = size or _INFER_WINDOW_DISABLED

    def restore(self, top: int) -> None:
        """Start from a persisted right edge: T = ``top`` and the whole window marked seen, so
        every sequence number <= ``top`` is rejected (too old or duplicate) and only numbers
        above it pass. Numbers inside the window that were never received are refused too:
        after a restart we cannot know which of them arrived."""
        if top < 0:
            raise ValueError("right edge must be >= 0")
        self.top = top
        self.bitmap = self._mask if top else 0

    def infer(self, seq_lo: int) -> int:
        """Full 64-bit sequence number for the low half ``seq_lo`` (RFC 4303 Appendix A2.2).

        May return a value <= 0 (a high half of -1 before the first block), which ``check``
        rejects as too old; a wrong guess otherwise simply fails the integrity check.
        """
        w = self._infer_w
        th, tl = self.top >> 32, self.top & _MASK32
        if tl >= w - 1:  # case A: the window lies inside one 2^32 block
            hi = th if seq_lo >= tl - w + 1 else th + 1
        else:  # case B: the window straddles a block boundary
            hi = th - 1 if seq_lo >= (tl - w + 1) % _SEQ_SPACE else th
        return (hi << 32) | seq_lo if hi >= 0 else -1

    def check(self, seq: int) -> ReplayCheck:
        """Steps 1-3 of RFC 4303 section 3.4.3, before integrity verification."""
        if seq <= 0:
            return ReplayCheck.TOO_OLD
        if not self.size:
            return ReplayCheck.OK
        diff = self.top - seq
        if diff < 0:
            return ReplayCheck.OK
        if diff >= self.size:
            return ReplayCheck.TOO_OLD
        if (self.bitmap >> diff) & 1:
            return ReplayCheck.DUPLICATE
        return ReplayCheck.OK

    def commit(self, seq: int) -> None:
        """Step 5: record ``seq`` after its ICV verified, sliding the window if it is new."""
        shift = seq - self.top
        if shift > 0:
            self.top = seq
            self.bitmap = ((self.bitmap << shift) | 1) & self._mask if shift < self.size else 1
        elif -shift < self.size:
            self.bitmap |= 1 << -shift
        # else: fell out of the window since check(); nothing to record


__all__ = ["ReplayCheck", "ReplayWindow"]
