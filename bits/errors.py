"""Exception root of the ``bits`` package.

Exceptions are for bugs, misuse and bad configuration. Bad *packets* never raise out of the engine:
they become typed, counted drops (``bits.verdict.Drop``). Wire parsers raise ``ParseError`` at the
boundary and the engine turns it into ``DropReason.MALFORMED``.
"""

from __future__ import annotations


class BitsError(Exception):
    """Root of every exception raised by ``bits``."""


class ParseError(BitsError):
    """Truncated or malformed wire input."""


class ConfigError(BitsError):
    """Bad configuration; names the file and line when it comes from a file."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        self.path = path
        self.line = line
        self.problem = message
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(f"{where}{message}")


class KeyFileError(ConfigError):
    """A key file is unsafe (readable by group or others) or unreadable."""


class SaExhaustedError(BitsError):
    """An SA's sequence number space is used up (RFC 4303 section 3.3.3); it must be re-keyed."""
