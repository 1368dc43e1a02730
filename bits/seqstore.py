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

This module is sans-I/O: ``SeqReserver`` is a protocol. ``MemorySeqReserver`` is for tests;
``bits.io.seqstore.FileSeqReserver`` is the durable adapter.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Protocol

from .errors import BitsError
from .sa import SaParams

_SA_ID_LABEL = b"mipbits seq-reservation v1\x00"
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


def sa_fingerprint(params: SaParams) -> str:
    """Stable id of an SA's keying for the reservation store: 32 hex digits of SHA-256 over a
    label, the algorithms and the (length-prefixed) keys. One-way: it reveals no key."""
    h = hashlib.sha256(_SA_ID_LABEL)
    enc, auth = params.enc.value.encode(), params.auth.value.encode()
    for part in (enc, params.enc_key, auth, params.auth_key):
        h.update(_LEN.pack(len(part)))
        h.update(part)
    return h.hexdigest()[:_SA_ID_HEX_LEN]


class MemorySeqReserver:
    """In-memory reserver for tests. ``marks`` plays the role of the disk: it survives as long as
    the object, so building a new SA on the same reserver simulates a restart."""

    def __init__(self, marks: dict[str, int] | None = None) -> None:
        self.marks: dict[str, int] = dict(marks or {})
        self.calls: list[tuple[str, int]] = []

    def load(self, sa_id: str) -> int:
        return self.marks.get(sa_id, 0)

    def reserve(self, sa_id: str, upto: int) -> None:
        self.calls.append((sa_id, upto))
        if upto > self.marks.get(sa_id, 0):
            self.marks[sa_id] = upto


__all__ = ["MemorySeqReserver", "SeqReserver", "SeqStoreError", "sa_fingerprint"]
