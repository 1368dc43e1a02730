"""The packet trace on disk: a JSON Lines file rotated by size, and a reader that follows it.

Writer: ``TraceWriter.write`` is the sink of a ``bits.trace.Tracer``. Lines are buffered and
written with one ``write(2)`` per batch (the processor calls ``flush`` whenever its queues go idle),
so a busy data path pays for a ``json.dumps`` per event, not for a system call.

Rotation (``path`` -> ``path.1`` -> ... -> ``path.KEEP``, oldest dropped) happens when the next
batch would take the file past ``max_bytes``. Two processes (the outbound and inbound workers) may
write the same file: the file is opened ``O_APPEND`` and every batch is one write of whole lines;
rotation is done under an ``flock`` on ``path.lock``, and a writer whose file was rotated away by
the other reopens ``path`` before its next batch.

Reader: ``TraceFollower.poll`` returns the records appended since the last call, across rotation
(it drains the renamed file before it opens the new one) and truncation, like ``tail -F``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..trace import Record, TraceLevel

LOG = logging.getLogger("mipbits.trace")
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_KEEP = 3
MIN_MAX_BYTES = 4096
_FLUSH_LINES = 512  # flush at least every this many buffered events
_dumps = json.JSONEncoder(separators=(",", ":"), default=str, check_circular=False).encode


@dataclass(frozen=True, slots=True)
class TraceSettings:
    """The ``[trace]`` section of a node configuration."""

    path: str | None = None  # None: no trace file (level is then effectively off)
    level: TraceLevel = TraceLevel.OFF
    max_bytes: int = DEFAULT_MAX_BYTES
    keep: int = DEFAULT_KEEP


def rotated_name(path: str | os.PathLike[str], n: int) -> str:
    return f"{os.fspath(path)}.{n}"


class TraceWriter:
    """Append JSON lines to ``path``, rotating by size. Not thread-safe (one per process)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int = DEFAULT_MAX_BYTES,
        keep: int = DEFAULT_KEEP,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = os.fspath(path)
        self.max_bytes = max(max_bytes, MIN_MAX_BYTES)
        self.keep = max(keep, 0)
        self._clock = clock
        self._lines: list[str] = []
        self._fd = -1
        self._ino = -1
        self.errors = 0
        self._error_logged = -1e9
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._open()

    # -- sink ------------------------------------------------------------------------------------

    def write(self, record: Record) -> None:
        """Buffer one event; stamps ``time`` (wall clock) when the record has none (it is ours:
        the tracer made it for us)."""
        if record.get("time") is None:
            record["time"] = self._clock()
        try:
            line = _dumps(record)
        except (TypeError, ValueError, RecursionError) as exc:  # a tracing bug must not cost packets
            line = _dumps({"time": record["time"], "event": "error", "component": "trace",
                           "detail": f"unencodable trace record: {exc}"})
        self._lines.append(line + "\n")
        if len(self._lines) >= _FLUSH_LINES:
            self.flush()

    __call__ = write

    def flush(self) -> None:
        """Write the buffered lines. A failing disk loses trace lines, never packets: the error
        is counted (``errors``) and logged at most once a minute."""
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        try:
            self._write_lines(lines)
        except OSError as exc:
            self.errors += 1
            now = time.monotonic()
            if now - self._error_logged >= 60.0:
                self._error_logged = now
                LOG.warning("trace %s: %s (%d lines lost)", self.path, exc, len(lines))

    def _write_lines(self, lines: list[str]) -> None:
        """One write(2) normally; split across files at a rotation."""
        size = self._current_size()
        total = sum(map(len, lines))  # json.dumps output is ASCII: characters == octets
        if size + total <= self.max_bytes:
            _write_all(self._fd, "".join(lines).encode())
            return
        chunk: list[str] = []
        for line in lines:
            if size > 0 and size + len(line) > self.max_bytes:
                if chunk:
                    _write_all(self._fd, "".join(chunk).encode())
                    chunk = []
                self._rotate()
                size = self._current_size()
            chunk.append(line)
            size += len(line)
        _write_all(self._fd, "".join(chunk).encode())

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # -- files -----------------------------------------------------------------------------------

    def _open(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._ino = os.fstat(self._fd).st_ino

    def _current_size(self) -> int:
        """Size of the file at ``path``; reopens it when another writer rotated ours away."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._open()
            return 0
        if st.st_ino != self._ino:
            self._open()
        return st.st_size

    def _rotate(self) -> None:
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                # Re-check under the lock: the other writer may have rotated already.
                st = os.stat(self.path)
                if st.st_ino == self._ino and st.st_size > 0:
                    self._shift_files()
            except FileNotFoundError:
                pass
            self._open()

    def _shift_files(self) -> None:
        if self.keep == 0:
            os.unlink(self.path)
            return
        for n in range(self.keep - 1, 0, -1):
            src = rotated_name(self.path, n)
            if os.path.exists(src):
                os.replace(src, rotated_name(self.path, n + 1))
        os.replace(self.path, rotated_name(self.path, 1))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def open_trace_writer(settings: TraceSettings) -> TraceWriter | None:
    """A writer for ``settings``, or None when tracing is off or has no path."""
    if settings.path is None or settings.level == TraceLevel.OFF:
        return None
    return TraceWriter(settings.path, settings.max_bytes, settings.keep)


# -- reading -------------------------------------------------------------------------------------


def parse_line(line: bytes | str) -> Record | None:
    """One JSON line -> dict; None for a blank or corrupt line (never raises)."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def read_all(path: str | os.PathLike[str], keep: int = DEFAULT_KEEP) -> Iterator[Record]:
    """Every record in the rotated files (oldest first) and then in ``path``."""
    names = [rotated_name(path, n) for n in range(keep, 0, -1)] + [os.fspath(path)]
    for name in names:
        try:
            with open(name, "rb") as f:
                for line in f:
                    record = parse_line(line)
                    if record is not None:
                        yield record
        except FileNotFoundError:
            continue


class TraceFollower:
    """Incremental reader of ``path`` that survives rotation and truncation (``tail -F``).

    ``poll()`` never blocks: it returns the complete lines appended since the last call. A partial
    last line stays buffered until its newline arrives. The file may not exist yet.
    """

    def __init__(self, path: str | os.PathLike[str], from_start: bool = False) -> None:
        self.path = os.fspath(path)
        self._f: BinaryIO | None = None
        self._ino = -1
        self._partial = b""
        self.bad_lines = 0
        self._try_open(at_end=not from_start)

    def _try_open(self, at_end: bool) -> bool:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return False
        self._f = f
        self._ino = os.fstat(f.fileno()).st_ino
        self._partial = b""
        if at_end:
            f.seek(0, os.SEEK_END)
        return True

    def poll(self) -> list[Record]:
        out: list[Record] = []
        if self._f is None and not self._try_open(at_end=False):
            return out
        self._seek_if_truncated()
        self._drain(out)
        while self._rotated():
            self._drain(out)  # lines written to the old file before it was renamed
            self._f.close()
            self._f = None
            if not self._try_open(at_end=False):
                break
            self._drain(out)
        return out

    def _rotated(self) -> bool:
        """``path`` is now another file (renamed away, or deleted and recreated)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False  # renamed, new one not created yet: keep the old one for now
        return st.st_ino != self._ino

    def _seek_if_truncated(self) -> None:
        f = self._f
        if os.fstat(f.fileno()).st_size < f.tell():
            f.seek(0)
            self._partial = b""

    def _drain(self, out: list[Record]) -> None:
        data = self._f.read()
        if not data:
            return
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if not line.strip():
                continue
            record = parse_line(line)
            if record is None:
                self.bad_lines += 1
            else:
                out.append(record)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def follow(
    path: str | os.PathLike[str],
    interval: float = 0.25,
    from_start: bool = False,
    stop: Callable[[], bool] = lambda: False,
) -> Iterator[Record]:
    """Yield records as they are appended, forever (or until ``stop()``)."""
    follower = TraceFollower(path, from_start=from_start)
    try:
        while not stop():
            batch = follower.poll()
            yield from batch
            if not batch:
                time.sleep(interval)
    finally:
        follower.close()
