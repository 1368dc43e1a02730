"""File adapter for ``bits.seqstore.SeqReserver``: one small file per SA id in a private directory.

Layout: ``<state_dir>/`` (mode 0700) holding ``<sa_id>.seq`` (mode 0600) whose content is the
decimal reservation mark and a newline. A reservation is written crash-safely:
write ``<sa_id>.seq.tmp`` -> fsync it -> rename over ``<sa_id>.seq`` -> fsync the directory. After
a crash the file holds either the old or the new mark, never a torn one, and ``reserve`` returns
only once the new one is on disk.

An unreadable or corrupt file raises ``SeqStoreError`` rather than reading as 0: starting the
counter from 0 again is exactly the nonce reuse this store exists to prevent.

It also implements ``bits.seqstore.ReplayStore`` for inbound SAs: ``<rx_id>.replay`` (0600) holds
the anti-replay right edge T as exactly 20 decimal digits and a newline. The file is created like
a mark (tmp, fsync, rename, fsync the directory); after that a save overwrites the 21 octets in
place with one ``pwrite`` -- a few microseconds, so about one save a second per moving SA costs
nothing measurable. A non-durable save (the periodic one) has no fsync: a process crash (kill -9,
OOM kill) keeps it, because the kernel already holds the write; a power loss or kernel crash may
lose what the kernel had not yet written back. A durable save (clean stop) adds ``fdatasync``.
Fixed width means an in-place write never leaves a tail of an older, longer value, and a 21-octet
write at offset 0 lies in one sector. A corrupt record raises ``SeqStoreError`` (never 0).
"""

from __future__ import annotations

import os
import re
import stat

from ..seqstore import SeqStoreError

_SA_ID = re.compile(r"[0-9a-f]{16,64}")
_MARK = re.compile(rb"(0|[1-9][0-9]{0,19})\n")
_MAX_MARK = 2**64 - 1
_TOP = re.compile(rb"([0-9]{20})\n")
_TOP_FMT = b"%020d\n"


class FileSeqReserver:
    """Durable ``SeqReserver`` backed by ``state_dir`` (created 0700 if missing)."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = os.fspath(state_dir)
        self._marks: dict[str, int] = {}
        self._tops: dict[str, int] = {}  # right edges as last read or written (page cache)
        self._unsynced: set[str] = set()  # ... and those written without fdatasync
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            st = os.stat(self.state_dir)
        except OSError as exc:
            raise SeqStoreError(f"sequence state dir {self.state_dir}: {exc.strerror}") from exc
        if not stat.S_ISDIR(st.st_mode):
            raise SeqStoreError(f"sequence state dir {self.state_dir} is not a directory")
        if st.st_mode & 0o077:
            raise SeqStoreError(f"sequence state dir {self.state_dir}: group/others have access")

    def _path(self, sa_id: str, suffix: str = ".seq") -> str:
        if not _SA_ID.fullmatch(sa_id):
            raise SeqStoreError(f"bad SA id {sa_id!r}")
        return os.path.join(self.state_dir, sa_id + suffix)

    @staticmethod
    def _read_number(path: str, pattern: re.Pattern[bytes], what: str) -> int:
        """The number stored at ``path`` (0 if there is no file); SeqStoreError if unreadable or
        corrupt: a counter must never silently restart at 0."""
        try:
            with open(path, "rb") as f:
                data = f.read(64)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise SeqStoreError(f"{path}: {exc.strerror}") from exc
        m = pattern.fullmatch(data)
        if m is None or int(m.group(1)) > _MAX_MARK:
            raise SeqStoreError(f"{path}: corrupt {what}")
        return int(m.group(1))

    def load(self, sa_id: str) -> int:
        mark = self._read_number(self._path(sa_id), _MARK, "sequence reservation")
        self._marks[sa_id] = max(mark, self._marks.get(sa_id, 0))
        return self._marks[sa_id]

    def reserve(self, sa_id: str, upto: int) -> None:
        if not 0 <= upto <= _MAX_MARK:
            raise SeqStoreError(f"reservation {upto} out of range")
        if sa_id not in self._marks:
            self.load(sa_id)  # never lower a mark written by an earlier run
        if upto <= self._marks[sa_id]:
            return
        path = self._path(sa_id)
        try:
            self._write_durably(path, b"%d\n" % upto)
        except OSError as exc:
            raise SeqStoreError(f"{path}: {exc.strerror}") from exc
        self._marks[sa_id] = upto

    # --- inbound right edges (bits.seqstore.ReplayStore) --------------------------------------

    def load_top(self, rx_id: str) -> int:
        top = self._read_number(self._path(rx_id, ".replay"), _TOP, "replay-window record")
        self._tops[rx_id] = max(top, self._tops.get(rx_id, 0))
        return self._tops[rx_id]

    def save_top(self, rx_id: str, top: int, *, durable: bool) -> None:
        if not 0 <= top <= _MAX_MARK:
            raise SeqStoreError(f"right edge {top} out of range")
        known = self._tops[rx_id] if rx_id in self._tops else self.load_top(rx_id)
        if top <= known:  # never lower; a durable save may still have to sync an earlier write
            if not (durable and rx_id in self._unsynced):
                return
            top = known
        path = self._path(rx_id, ".replay")
        data = _TOP_FMT % top
        try:
            if not self._overwrite(path, data, durable):
                self._write_durably(path, data)  # first record: created crash-safely, synced
                durable = True
        except OSError as exc:
            raise SeqStoreError(f"{path}: {exc.strerror}") from exc
        self._tops[rx_id] = top
        if durable:
            self._unsynced.discard(rx_id)
        else:
            self._unsynced.add(rx_id)

    @staticmethod
    def _overwrite(path: str, data: bytes, durable: bool) -> bool:
        """Write ``data`` over the start of an existing record; False if there is none yet."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        try:
            if os.pwrite(fd, data, 0) != len(data):
                raise OSError(0, "short write")
            if durable:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        return True

    def _write_durably(self, path: str, data: bytes) -> None:
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # O_CREAT keeps the mode of a stale tmp file
            if os.write(fd, data) != len(data):
                raise OSError(0, "short write")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


__all__ = ["FileSeqReserver"]
