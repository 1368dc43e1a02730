"""Durable sequence-number reservations: never reuse a (key, nonce) pair across restarts.

For AES-GCM and ChaCha20-Poly1305 the explicit IV is the 64-bit sequence number (see
``bits/transforms.py``), so the nonce ``salt || IV`` repeats exactly when a sequence number repeats
under the same key. With manual (static) keys a restart would start the counter at 0 again and
reuse nonces -- catastrophic for GCM (RFC 4106 section 9, RFC 7634 section 4). So an outbound SA
persists a *reservation mark* ahead of what it sends:

- ``load(sa_id)`` returns the mark M: every sequence number that may ever have been sent is <= M.
  The SA continues at M + 1 (a fresh store returns 0: the RFC 4303 counter starts at 0).
- Before sending a sequence number n above its mark, the SA calls
  ``reserve(sa_id, n - 1 + SEQ_RESERVE_BLOCK)``; the call must be durable before it returns.
  Only then is n used.

A crash at any point leaves a mark >= every sequence number sent, so the next start never reuses
one; it merely skips at most one block. The peer's replay window also keeps accepting us, because
our numbers only grow. ``docs/esp.md`` has the full argument.

The store is keyed by ``sa_id``: a fingerprint of the *key material* (not of the SPI or
addresses), because nonce uniqueness is a property of the key -- the same key configured under a
new SPI must still continue its old counter. The fingerprint is a truncated SHA-256 and reveals no
key.

Inbound SAs use the sibling protocol ``ReplayStore`` to keep the anti-replay right edge T across
restarts (a replayed packet must stay a replay after we restart). Unlike the outbound mark, T is
*not* reserved ahead -- that would make us refuse the peer's next packets after a restart, for
hours on a low-rate SA -- but saved behind: the SA saves T at most once a second while it moves
(no fsync: a process crash keeps what the kernel has) and durably on a clean stop (``flush()``).
On start the window resumes at the saved T with the whole window marked seen. ``docs/esp.md``
section 2 states the residual window after a crash. Inbound records are keyed by
``replay_fingerprint``: the keying plus SPI and ESN flag (two inbound SAs may share a key; a new
key starts a new counter at the peer).

This module is sans-I/O: ``SeqReserver`` and ``ReplayStore`` are protocols. ``MemorySeqReserver``
is for tests; ``bits.io.seqstore.FileSeqReserver`` is the durable adapter. Both implement both.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Protocol, runtime_checkable

from .errors import BitsError
from .sa import SaParams

_SA_ID_LABEL = b"mipbits seq-reservation v1\x00"
_RX_ID_LABEL = b"mipbits replay-window v1\x00"
_SA_ID_HEX_LEN = 32  # 128 bits
_LEN = struct.Struct("!H")


class SeqStoreError(BitsError):
    """The reservation store could not be read or written durably (the SA must not send)."""


class SeqReserver(Protocol):
    def load(self, sa_id: str) -> int:
        """The persisted mark for ``sa_id`` (0 when none). Raises SeqStoreError if unreadable."""
        ...

    def reserve(self, sa_id: str, upto: int) -> None:
        """Durably record that sequence numbers up to ``upto`` may be used. Must not return
        before the record survives a crash; never lowers a mark. Raises SeqStoreError."""
        ...


@runtime_checkable
class ReplayStore(Protocol):
    """Where an inbound SA keeps its anti-replay right edge T (RFC 4303 section 3.4.3)."""

    def load_top(self, rx_id: str) -> int:
        """The saved right edge for ``rx_id`` (0 when none). Raises SeqStoreError if unreadable."""
        ...

    def save_top(self, rx_id: str, top: int, *, durable: bool) -> None:
        """Record T = ``top``; never lowers a saved value. ``durable=False`` must be cheap (no
        fsync: it runs on the packet thread about once a second per moving SA) and survive a
        process crash; ``durable=True`` must not return before the value survives a power loss.
        Raises SeqStoreError (or OSError)."""
        ...


def sa_fingerprint(params: SaParams) -> str:
    """Stable id of an SA's keying for the reservation store: 32 hex digits of SHA-256 over a
    label, the algorithms and the (length-prefixed) keys. One-way: it reveals no key."""
    return _keying_hash(_SA_ID_LABEL, params).hexdigest()[:_SA_ID_HEX_LEN]


def replay_fingerprint(params: SaParams) -> str:
    """Id of an inbound SA's saved right edge: like ``sa_fingerprint`` (another label) plus the
    SPI and the ESN flag. Not the addresses: the outer addresses are not authenticated, so a
    captured packet must stay a replay whatever address the SA is later configured with."""
    h = _keying_hash(_RX_ID_LABEL, params)
    h.update(struct.pack("!IB", params.spi, params.esn))
    return h.hexdigest()[:_SA_ID_HEX_LEN]


def _keying_hash(label: bytes, params: SaParams) -> hashlib._Hash:
    h = hashlib.sha256(label)
    enc, auth = params.enc.value.encode(), params.auth.value.encode()
    for part in (enc, params.enc_key, auth, params.auth_key):
        h.update(_LEN.pack(len(part)))
        h.update(part)
    return h


class MemorySeqReserver:
    """In-memory store for tests. ``marks`` (outbound) and ``tops`` (inbound right edges) play the
    role of the page cache, ``synced_tops`` that of the disk: they survive as long as the object,
    so building a new SA on the same store simulates a restart (``power_loss()`` first: a
    power loss)."""

    def __init__(self, marks: dict[str, int] | None = None) -> None:
        self.marks: dict[str, int] = dict(marks or {})
        self.calls: list[tuple[str, int]] = []
        self.tops: dict[str, int] = {}
        self.synced_tops: dict[str, int] = {}
        self.top_calls: list[tuple[str, int, bool]] = []

    def load_top(self, rx_id: str) -> int:
        return self.tops.get(rx_id, 0)

    def save_top(self, rx_id: str, top: int, *, durable: bool) -> None:
        self.top_calls.append((rx_id, top, durable))
        top = max(top, self.tops.get(rx_id, 0))
        self.tops[rx_id] = top
        if durable:
            self.synced_tops[rx_id] = top

    def power_loss(self) -> None:
        """Forget the right edges that were not saved durably."""
        self.tops = dict(self.synced_tops)

    def load(self, sa_id: str) -> int:
        return self.marks.get(sa_id, 0)

    def reserve(self, sa_id: str, upto: int) -> None:
        self.calls.append((sa_id, upto))
        if upto > self.marks.get(sa_id, 0):
            self.marks[sa_id] = upto


__all__ = [
    "MemorySeqReserver",
    "ReplayStore",
    "SeqReserver",
    "SeqStoreError",
    "replay_fingerprint",
    "sa_fingerprint",
]
