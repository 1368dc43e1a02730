"""Exception root of the ``mobility`` package.

Exceptions are for bugs, misuse and protocol refusals. Malformed *packets* raise ``ParseError`` at the
wire boundary (``mobility.mh``, ``mobility.options``, ``mobility.ipv6ext``); the caller turns it into a
typed drop. ``ParseError`` is also a ``bits.errors.ParseError`` so that one ``except`` in an adapter
that already handles the IPsec engine's parse errors covers the Mobility Header codec too.
"""

from __future__ import annotations

from bits import errors as _bits_errors

from .constants import BaStatus


class MobilityError(Exception):
    """Root of every exception raised by ``mobility``."""


class ParseError(MobilityError, _bits_errors.ParseError):
    """Truncated or malformed wire input (Mobility Header, mobility option, IPv6 extension header).

    ``pointer``, when set, is the offset inside the Mobility Header of the offending field, for the
    ICMPv6 Parameter Problem (code 0) that RFC 6275 9.2 asks for when Payload Proto is not 59
    (pointer 0) or Header Len is too small for the message type (pointer 1).
    """

    def __init__(self, message: str, *, pointer: int | None = None) -> None:
        super().__init__(message)
        self.pointer = pointer


class EncodeError(MobilityError, ValueError):
    """A message or option holds a value that does not fit its wire format (misuse, not bad input)."""


class BindingError(MobilityError):
    """A Binding Update is refused; carries the Binding Acknowledgement status (RFC 6275 6.1.8).

    Raised by binding-cache code so that the HA builds its BA from ``status`` (h2's ``error_code``
    pattern). ``status`` is always >= 128 (a rejection).
    """

    def __init__(self, status: BaStatus | int, detail: str = "") -> None:
        try:
            status = BaStatus(status)
        except ValueError:
            status = int(status)
        if not 128 <= status <= 255:
            raise EncodeError(f"BindingError needs a rejecting BA status (128..255), got {status}")
        self.status = status
        self.detail = detail
        name = status.name if isinstance(status, BaStatus) else "unassigned"
        super().__init__(f"BA status {int(status)} ({name})" + (f": {detail}" if detail else ""))
