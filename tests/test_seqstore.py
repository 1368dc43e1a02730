"""Sequence-number reservations (bits/seqstore.py, bits/io/seqstore.py): no (key, nonce) reuse
across restarts and crashes."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bits.constants import MAX_SEQ32, SEQ_RESERVE_BLOCK, AuthAlg, Direction, EncAlg, Mode
from bits.esp import SecurityAssociation
from bits.io.seqstore import FileSeqReserver
from bits.sa import SaParams
from bits.seqstore import MemorySeqReserver, SeqStoreError, sa_fingerprint
from bits.verdict import Drop, DropReason

A = ipaddress.ip_address("2001:db8:1::1")
B = ipaddress.ip_address("2001:db8:2::1")
KEY = bytes(range(16)) + b"salt"
OUT = SaParams(0x1001, A, B, Direction.OUT, Mode.TUNNEL, EncAlg.AES_GCM_16, KEY)
IN = dataclasses.replace(OUT, direction=Direction.IN)
INNER = bytes.fromhex("6000000000081140") + A.packed + B.packed + bytes(8)
BLOCK = SEQ_RESERVE_BLOCK


def iv_of(esp_packet: bytes) -> int:
    """The explicit AEAD IV of an IPv6 tunnel-mode ESP packet (after 40 + 8 octets)."""
    return int.from_bytes(esp_packet[48:56], "big")


def send(sa: SecurityAssociation, n: int) -> list[bytes]:
    out = [sa.encapsulate(INNER, 0.0) for _ in range(n)]
    assert all(isinstance(p, bytes) for p in out)
    return out  # type: ignore[return-value]


# --- fingerprint ------------------------------------------------------------------------------


def test_fingerprint_is_a_hash_of_the_keying_only() -> None:
    fp = sa_fingerprint(OUT)
    assert len(fp) == 32 and int(fp, 16) >= 0
    assert KEY.hex() not in fp and KEY[:8].hex() not in fp
    # nonce uniqueness is per key: a new SPI, direction or address keeps the counter
    assert sa_fingerprint(dataclasses.replace(OUT, spi=0x2002, dst=A)) == fp
    assert sa_fingerprint(dataclasses.replace(OUT, enc_key=KEY[:-1] + b"T")) != fp  # new salt
    cbc = dataclasses.replace(
        OUT, enc=EncAlg.AES_CBC, enc_key=KEY[:16], auth=AuthAlg.HMAC_SHA256_128, auth_key=bytes(32)
    )
    other_auth_key = dataclasses.replace(cbc, auth_key=bytes(31) + b"\x01")
    assert sa_fingerprint(cbc) != sa_fingerprint(other_auth_key)


# --- in-memory reserver and the SA's reservation protocol ----------------------------------


def test_first_packet_reserves_a_block_before_it_is_sent() -> None:
    r = MemorySeqReserver()
    sa = SecurityAssociation(OUT, rand=os.urandom, reserver=r, now=0.0)
    assert r.calls == []  # nothing reserved before anything is sent
    send(sa, 1)
    assert r.calls == [(sa.sa_id, BLOCK)]
    send(sa, BLOCK - 1)
    assert len(r.calls) == 1  # seq 1..BLOCK covered by one durable write
    send(sa, 1)
    assert r.calls[-1] == (sa.sa_id, 2 * BLOCK)


def test_every_sent_sequence_number_was_durable_first() -> None:
    r = MemorySeqReserver()
    sa = SecurityAssociation(OUT, rand=os.urandom, reserver=r, now=0.0)
    for _ in range(2 * BLOCK + 5):
        pkt = sa.encapsulate(INNER, 0.0)
        assert isinstance(pkt, bytes)
        assert iv_of(pkt) <= r.marks[sa.sa_id]


def test_restart_continues_after_the_mark_and_never_reuses_an_iv() -> None:
    r = MemorySeqReserver()
    peer = SecurityAssociation(IN, rand=os.urandom, now=0.0)
    ivs: list[int] = []
    for run in range(4):  # start, send, "restart" (a new SA object on the same store)
        sa = SecurityAssociation(OUT, rand=os.urandom, reserver=r, now=0.0)
        packets = send(sa, 10 + run * 1000)
        ivs += [iv_of(p) for p in packets]
        for p in packets:  # the peer's replay window keeps accepting us across our restarts
            assert isinstance(peer.decapsulate(p, 40, 0.0), bytes)
    assert len(ivs) == len(set(ivs))
    assert ivs == sorted(ivs)


def test_crash_between_reservations_never_reuses() -> None:
    """Kill the sender at any point inside a block: the next start is beyond everything sent."""
    r = MemorySeqReserver()
    sa = SecurityAssociation(OUT, rand=os.urandom, reserver=r, now=0.0)
    before = [iv_of(p) for p in send(sa, BLOCK + 17)]  # crosses into a second block, then "crash"
    sa2 = SecurityAssociation(OUT, rand=os.urandom, reserver=r, now=0.0)
    assert sa2.seq == 2 * BLOCK  # resumes at the persisted mark, skipping the unused tail
    after = [iv_of(p) for p in send(sa2, 3)]
    assert min(after) > max(before)
    assert after[0] == 2 * BLOCK + 1


@settings(max_examples=30, deadline=None)
@given(runs=st.lists(st.integers(min_value=0, max_value=3 * BLOCK), min_size=1, max_size=5))
def test_random_crash_points_never_reuse_a_nonce(runs: list[int]) -> None:
    r = MemorySeqReserver()
    seen: set[int] = set()
    for n in runs:
        sa = SecurityAssociation(OUT, rand=os.urandom, reserver=r, now=0.0)
        for _ in range(n):
            seq = sa.seq + 1
            pkt = sa.encapsulate(INNER, 0.0)
            assert isinstance(pkt, bytes) and iv_of(pkt) == seq
            assert seq not in seen
            seen.add(seq)


class FailingReserver(MemorySeqReserver):
    def __init__(self) -> None:
        super().__init__()
        self.fail = True

    def reserve(self, sa_id: str, upto: int) -> None:
        if self.fail:
            raise SeqStoreError("disk full")
        super().reserve(sa_id, upto)


def test_failed_reservation_drops_and_does_not_consume_the_sequence_number() -> None:
    r = FailingReserver()
    sa = SecurityAssociation(OUT, rand=os.urandom, reserver=r, now=0.0)
    d = sa.encapsulate(INNER, 0.0)
    assert isinstance(d, Drop) and d.reason is DropReason.SEQ_NOT_PERSISTED
    assert sa.seq == 0 and sa.stats.packets == 0 and sa.stats.other_drops == 1
    r.fail = False
    assert iv_of(send(sa, 1)[0]) == 1


def test_reservation_is_capped_at_the_last_sequence_number() -> None:
    r = MemorySeqReserver()
    sa_id = sa_fingerprint(OUT)
    r.marks[sa_id] = MAX_SEQ32 - 2
    sa = SecurityAssociation(OUT, rand=os.urandom, reserver=r, now=0.0)
    assert [iv_of(p) for p in send(sa, 2)] == [MAX_SEQ32 - 1, MAX_SEQ32]
    assert r.calls == [(sa_id, MAX_SEQ32)]
    d = sa.encapsulate(INNER, 0.0)
    assert isinstance(d, Drop) and d.reason is DropReason.SEQ_EXHAUSTED


def test_inbound_sa_does_not_touch_the_outbound_marks() -> None:
    """Same keys: the inbound SA neither continues nor reserves the outbound counter (its own
    record is the right edge, tests/test_esp_restart.py)."""
    r = MemorySeqReserver({sa_fingerprint(OUT): 500})
    sa = SecurityAssociation(IN, rand=os.urandom, reserver=r, now=0.0)
    assert sa.seq == 0 and r.calls == [] and sa.replay.top == 0


# --- file adapter ---------------------------------------------------------------------------------


def test_file_reserver_creates_private_dir_and_files(tmp_path) -> None:
    d = tmp_path / "state" / "seq"
    r = FileSeqReserver(d)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    sa_id = "ab" * 16
    assert r.load(sa_id) == 0
    r.reserve(sa_id, 4096)
    f = d / f"{sa_id}.seq"
    assert f.read_bytes() == b"4096\n"
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    assert sorted(os.listdir(d)) == [f"{sa_id}.seq"]  # no temporary file left behind
    assert FileSeqReserver(d).load(sa_id) == 4096  # a new process sees it


def test_file_reserver_never_lowers_a_mark(tmp_path) -> None:
    sa_id = "cd" * 16
    FileSeqReserver(tmp_path / "s").reserve(sa_id, 9000)
    r = FileSeqReserver(tmp_path / "s")  # a later run that has not loaded yet
    r.reserve(sa_id, 100)
    assert FileSeqReserver(tmp_path / "s").load(sa_id) == 9000


def test_file_reserver_write_order_is_crash_safe(tmp_path, monkeypatch) -> None:
    """tmp file written and fsynced, renamed over the real one, then the directory fsynced."""
    r = FileSeqReserver(tmp_path / "s")
    log: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        log.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        assert os.path.exists(src) and str(src).endswith(".tmp")
        log.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    r.reserve("ef" * 16, 1)
    assert log == ["fsync-file", "rename", "fsync-dir"]


def test_crash_before_rename_keeps_the_old_mark(tmp_path, monkeypatch) -> None:
    sa_id = "12" * 16
    r = FileSeqReserver(tmp_path / "s")
    r.reserve(sa_id, 4096)

    def crash(src, dst) -> None:
        raise OSError(5, "simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(SeqStoreError):
        r.reserve(sa_id, 8192)
    monkeypatch.undo()
    assert FileSeqReserver(tmp_path / "s").load(sa_id) == 4096


def test_sa_with_file_store_survives_restart(tmp_path) -> None:
    d = tmp_path / "seq"
    sa = SecurityAssociation(OUT, rand=os.urandom, reserver=FileSeqReserver(d), now=0.0)
    first = [iv_of(p) for p in send(sa, 5)]
    del sa  # "kill -9": no shutdown hook writes anything
    sa2 = SecurityAssociation(OUT, rand=os.urandom, reserver=FileSeqReserver(d), now=0.0)
    second = [iv_of(p) for p in send(sa2, 5)]
    assert first == [1, 2, 3, 4, 5]
    assert second == [BLOCK + 1 + i for i in range(5)]


@pytest.mark.parametrize(
    "content", [b"", b"12", b"-5\n", b"0x10\n", b"12\n13\n", b"007\n", b"1" * 30 + b"\n"]
)
def test_corrupt_file_refuses_to_start_at_zero(tmp_path, content: bytes) -> None:
    d = tmp_path / "s"
    r = FileSeqReserver(d)
    sa_id = "34" * 16
    (d / f"{sa_id}.seq").write_bytes(content)
    with pytest.raises(SeqStoreError, match="corrupt"):
        r.load(sa_id)


def test_corrupt_file_makes_the_sa_constructor_fail(tmp_path) -> None:
    d = tmp_path / "s"
    r = FileSeqReserver(d)
    (d / f"{sa_fingerprint(OUT)}.seq").write_bytes(b"garbage")
    with pytest.raises(SeqStoreError):
        SecurityAssociation(OUT, rand=os.urandom, reserver=r, now=0.0)


def test_state_dir_must_be_private(tmp_path) -> None:
    d = tmp_path / "open"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    with pytest.raises(SeqStoreError, match="group/others have access"):
        FileSeqReserver(d)


def test_bad_sa_id_is_rejected(tmp_path) -> None:
    r = FileSeqReserver(tmp_path / "s")
    with pytest.raises(SeqStoreError):
        r.load("../../etc/passwd")
