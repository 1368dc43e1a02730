"""Typed packet verdicts and drop reasons (the engine's equivalent of OpenBSD ``espstat``)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class DropReason(str, Enum):
    # policy
    DISCARD_POLICY = "discard-policy"  # an SPD entry says DISCARD (incl. the final default entry)
    NO_SA = "no-sa"  # PROTECT entry whose SA is missing
    CLEARTEXT_PROTECTED = "cleartext-protected"  # inbound cleartext that policy says must be ESP
    SELECTOR_MISMATCH = "selector-mismatch"  # decrypted packet outside its SA's selectors (RFC 4301 5.2)
    # ESP input
    UNKNOWN_SPI = "unknown-spi"
    MALFORMED = "malformed"  # truncated / unparsable IP or ESP
    REPLAY = "replay"
    AUTH_FAILED = "auth-failed"
    BAD_PADDING = "bad-padding"
    BAD_NEXT_HEADER = "bad-next-header"
    DUMMY = "dummy"  # Next Header 59 (RFC 4303 2.6): dropped by design, still counted
    # SA state
    SEQ_EXHAUSTED = "seq-exhausted"  # sequence counter would cycle (RFC 4303 3.3.3)
    SA_EXPIRED = "sa-expired"  # hard lifetime reached
    SEQ_NOT_PERSISTED = "seq-not-persisted"  # sequence reservation not durable (bits/seqstore.py)
    TOO_BIG = "too-big"  # result would exceed 65535 octets
    FRAGMENT = "fragment"  # fragmented packet: selectors unknown, reassembly is the kernel's job
    # adapter
    CROSS_FAMILY = "cross-family"  # result of another IP version: sent by bits.io.crossfamily, original dropped


@dataclass(frozen=True, slots=True)
class Drop:
    reason: DropReason
    spi: int | None = None
    seq: int | None = None
    detail: str = ""

    def __bool__(self) -> bool:  # a Drop is never mistaken for packet bytes in an `if`
        return False
