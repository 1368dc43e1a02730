"""Inbound anti-replay across restarts (docs/esp.md section 2): the right edge T is saved while it
moves and durably on flush(); a restarted SA resumes there with the whole window marked seen.

A "restart" is a new SecurityAssociation on the same store: the same MemorySeqReserver object, or a
new FileSeqReserver on the same directory (what a new process sees). A clean stop calls flush();
a crash (kill -9) calls nothing.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable

import pytest

from bits.constants import Direction
from bits.engine import build_engine
from bits.esp import REPLAY_SAVE_INTERVAL, SecurityAssociation, flush_all
from bits.io.seqstore import FileSeqReserver
from bits.sa import Lifetime
from bits.seqstore import (
    MemorySeqReserver,
    ReplayStore,
    SeqStoreError,
    replay_fingerprint,
    sa_fingerprint,
)
from bits.setkey import parse_setkey
from bits.verdict import Drop, DropReason

from .test_esp_support import A6, B6, sa_params

INNER = bytes.fromhex("6000000000081140") + A6.packed + B6.packed + bytes(8)
OUT_P = sa_params("gcm128", "tunnel6in6")
IN_P = dataclasses.replace(OUT_P, direction=Direction.IN)
Opener = Callable[[], ReplayStore]


@pytest.fixture(params=["memory", "file"])
def open_store(request, tmp_path) -> Opener:
    """Returns what a (re)started process gets: the surviving memory store, or a new file store
    on the same state directory."""
    if request.param == "memory":
        mem = MemorySeqReserver()
        return lambda: mem
    return lambda: FileSeqReserver(tmp_path / "state")


def sender(start_seq: int = 0, params=OUT_P) -> SecurityAssociation:
    marks = MemorySeqReserver({sa_fingerprint(params): start_seq})
    return SecurityAssociation(params, rand=os.urandom, reserver=marks, now=0.0)


def receiver(store: ReplayStore | None, now: float = 0.0, params=IN_P) -> SecurityAssociation:
    sa = SecurityAssociation(params, rand=os.urandom, reserver=store, now=now)  # type: ignore
    return sa


def send(sa: SecurityAssociation, n: int) -> list[bytes]:
    out = [sa.encapsulate(INNER, 0.0) for _ in range(n)]
    assert all(isinstance(p, bytes) for p in out)
    return out  # type: ignore[return-value]


def accept_all(sa: SecurityAssociation, packets: list[bytes], now: float = 0.0) -> None:
    for p in packets:
        assert sa.decapsulate(p, 40, now) == INNER


def replay_verdicts(sa: SecurityAssociation, packets: list[bytes]) -> list[str]:
    """'ok' or the drop reason of each packet, in order."""
    out = []
    for p in packets:
        v = sa.decapsulate(p, 40, 0.0)
        out.append("ok" if v == INNER else v.reason.value if isinstance(v, Drop) else "?")
    return out


# --- clean restart: no residual window ---------------------------------------------------------


def test_clean_restart_every_old_packet_is_a_counted_replay_drop(open_store: Opener) -> None:
    tx = sender()
    old = send(tx, 200)  # more than the 64-packet window: too-old and duplicate cases
    rx = receiver(open_store())
    accept_all(rx, old)
    rx.flush()  # clean stop
    rx2 = receiver(open_store())
    assert rx2.replay.top == 200
    drops = [rx2.decapsulate(p, 40, 0.0) for p in old]
    assert all(isinstance(d, Drop) and d.reason is DropReason.REPLAY for d in drops)
    assert {d.detail for d in drops} == {"too-old", "duplicate"}  # type: ignore[union-attr]
    assert rx2.stats.replay_drops == 200 and rx2.stats.packets == 0
    fresh = send(tx, 3)  # the peer goes on: accepted
    accept_all(rx2, fresh)
    assert replay_verdicts(rx2, fresh) == ["replay"] * 3


def test_clean_restart_refuses_unreceived_numbers_below_the_edge(open_store: Opener) -> None:
    """A packet still in flight at the stop (never received) is refused after it: we cannot know
    which numbers inside the window arrived. A cost of at most one window of late packets."""
    tx = sender()
    packets = send(tx, 10)
    rx = receiver(open_store())
    accept_all(rx, packets[:5] + packets[6:])  # seq 6 is late
    rx.flush()
    assert replay_verdicts(receiver(open_store()), [packets[5]]) == ["replay"]


def test_repeated_restarts_with_live_traffic(open_store: Opener) -> None:
    tx = sender()
    history: list[bytes] = []
    for _ in range(4):
        rx = receiver(open_store())
        assert replay_verdicts(rx, history[-100:]) == ["replay"] * len(history[-100:])
        new = send(tx, 50)
        accept_all(rx, new)
        history += new
        rx.flush()


def test_flush_is_durable_idempotent_and_skipped_when_nothing_moved() -> None:
    store = MemorySeqReserver()
    rx = receiver(store)
    rx.flush()
    assert store.top_calls == []  # nothing received: nothing to write
    accept_all(rx, send(sender(), 3))
    rx.flush()
    rx.flush()
    assert store.top_calls == [(rx._rx_id, 3, True)]
    assert store.synced_tops == {rx._rx_id: 3}


def test_flush_never_overwrites_another_process_with_a_stale_edge(tmp_path) -> None:
    """workers = 2: the outbound worker also builds the inbound SAs but never feeds them, so its
    flush on stop must not write the edge it loaded over the inbound worker's newer one."""
    d = tmp_path / "state"
    rx_id = replay_fingerprint(IN_P)
    FileSeqReserver(d).save_top(rx_id, 500, durable=True)
    idle = receiver(FileSeqReserver(d))  # outbound worker, loads 500
    FileSeqReserver(d).save_top(rx_id, 900, durable=True)  # inbound worker moves on
    idle.flush()
    assert FileSeqReserver(d).load_top(rx_id) == 900


def test_outbound_and_storeless_sas_flush_as_no_ops() -> None:
    store = MemorySeqReserver()
    tx = SecurityAssociation(OUT_P, rand=os.urandom, reserver=store, now=0.0)
    send(tx, 2)
    tx.flush()
    rx = receiver(None)
    accept_all(rx, send(sender(), 2))
    rx.flush()
    assert store.top_calls == [] and rx.next_timer() is None


# --- periodic saves through the timer -------------------------------------------------------------


def test_moving_edge_is_saved_by_the_timer_at_most_once_per_interval() -> None:
    store = MemorySeqReserver()
    rx = receiver(store, now=100.0)
    tx = sender()
    assert rx.next_timer() is None  # nothing moved: no timer
    accept_all(rx, send(tx, 2), now=100.5)
    assert rx.next_timer() == 100.0  # first movement: due at once (the adapter's next check)
    rx.handle_timer(100.6)
    assert store.top_calls == [(rx._rx_id, 2, False)]  # no fsync on the packet thread
    assert rx.next_timer() is None
    accept_all(rx, send(tx, 5), now=100.7)
    assert rx.next_timer() == pytest.approx(100.6 + REPLAY_SAVE_INTERVAL)
    rx.handle_timer(101.0)  # too early
    assert len(store.top_calls) == 1
    rx.handle_timer(101.6)
    assert store.top_calls[-1] == (rx._rx_id, 7, False)
    rx.handle_timer(105.0)  # nothing new
    assert len(store.top_calls) == 2


def test_save_timer_combines_with_lifetime_timers() -> None:
    params = dataclasses.replace(IN_P, soft=Lifetime(seconds=30), hard=Lifetime(seconds=60))
    store = MemorySeqReserver()
    rx = receiver(store, now=0.0, params=params)
    assert rx.next_timer() == 30.0
    accept_all(rx, send(sender(), 1), now=10.0)
    assert rx.next_timer() == 0.0  # the save is due before the soft limit
    rx.handle_timer(10.0)
    assert rx.next_timer() == 30.0
    rx.handle_timer(60.0)  # hard expiry
    assert rx.hard_expired and rx.next_timer() is None
    rx.flush()  # an expired SA still leaves its edge behind (static config re-adds it)
    assert store.synced_tops[rx._rx_id] == 1


def test_engine_timers_drive_the_saves_of_every_sa(tmp_path) -> None:
    """The adapter's existing loop (engine.next_timer / engine.handle_timer) saves the edge."""
    k1 = "0x" + "11" * 16 + "a1a2a3a4"
    conf = f"""
    add {A6} {B6} esp 0x1001 -m tunnel -E aes-gcm-16 {k1};
    spdadd {A6} {B6} any -P out ipsec esp/tunnel/{A6}-{B6}/require;
    """
    conf_b = conf.replace("-P out", "-P in")
    d = tmp_path / "state"
    a = build_engine(parse_setkey(conf, local_addresses=[str(A6)]), rand=os.urandom, now=0.0)
    b_cfg = parse_setkey(conf_b, local_addresses=[str(B6)])
    b = build_engine(b_cfg, rand=os.urandom, now=0.0, reserver=FileSeqReserver(d))
    wires = [a.process_outbound(INNER, 1.0) for _ in range(5)]
    assert [b.process_inbound(w, 1.0) for w in wires] == [INNER] * 5
    due = b.next_timer()
    assert due is not None and due <= 1.0
    b.handle_timer(1.0)
    # kill -9 here: a new process on the same directory refuses every old packet
    b2 = build_engine(b_cfg, rand=os.urandom, now=2.0, reserver=FileSeqReserver(d))
    assert all(isinstance(b2.process_inbound(w, 2.0), Drop) for w in wires)
    assert b2.drops[DropReason.REPLAY] == 5
    assert b2.process_inbound(a.process_outbound(INNER, 2.0), 2.0) == INNER


# --- crash (kill -9): the residual window ---------------------------------------------------------


def test_crash_residual_is_what_was_accepted_since_the_last_save(open_store: Opener) -> None:
    tx = sender()
    rx = receiver(open_store())
    saved = send(tx, 10)
    accept_all(rx, saved, now=0.5)
    rx.handle_timer(0.5)  # periodic save: T = 10
    unsaved = send(tx, 5)
    accept_all(rx, unsaved, now=0.8)
    del rx  # kill -9 at 0.9 s: no flush, no timer ran since 0.5 s
    rx2 = receiver(open_store())
    assert rx2.replay.top == 10
    assert replay_verdicts(rx2, saved) == ["replay"] * 10
    # the residual: numbers accepted after the last save pass once more, then never again
    assert replay_verdicts(rx2, unsaved) == ["ok"] * 5
    assert replay_verdicts(rx2, unsaved) == ["replay"] * 5
    accept_all(rx2, send(tx, 2))


def test_power_loss_falls_back_to_the_last_durable_edge() -> None:
    store = MemorySeqReserver()
    tx = sender()
    rx = receiver(store)
    first = send(tx, 4)
    accept_all(rx, first)
    rx.flush()  # durable: 4
    accept_all(rx, send(tx, 4), now=2.0)
    rx.handle_timer(2.0)  # page cache only: 8
    store.power_loss()
    rx2 = receiver(store)
    assert rx2.replay.top == 4
    assert replay_verdicts(rx2, first) == ["replay"] * 4


# --- low-rate SAs (a BU/BA SA: a few packets an hour) ---------------------------------------------


def test_low_rate_sa_keeps_working_across_restarts_and_crashes(open_store: Opener) -> None:
    """Nothing is reserved ahead on the receive side: the edge saved is exactly the last number
    accepted, so the peer's next packet, however late, is accepted after our restart."""
    tx = sender()
    t = 0.0
    for hour in range(6):
        rx = receiver(open_store(), now=t)
        t += 3600.0
        (pkt,) = send(tx, 1)
        assert rx.decapsulate(pkt, 40, t) == INNER
        if hour % 2:
            rx.flush()  # clean restart
        else:
            rx.handle_timer(t + 0.5)  # the adapter's timer, then kill -9
        assert open_store().load_top(rx._rx_id) == hour + 1


def test_peer_restart_with_a_skipped_block_is_accepted(open_store: Opener) -> None:
    """The peer's own restart jumps its counter past its reservation mark: still above our T."""
    peer_marks = MemorySeqReserver()
    rx = receiver(open_store())
    for _ in range(3):
        tx = SecurityAssociation(OUT_P, rand=os.urandom, reserver=peer_marks, now=0.0)
        accept_all(rx, send(tx, 2))
        rx.flush()
        rx = receiver(open_store())


# --- ESN (RFC 4303 Appendix A) --------------------------------------------------------------------


@pytest.mark.parametrize("clean", [True, False], ids=["clean", "crash"])
def test_esn_edge_survives_a_restart_across_the_2_32_boundary(open_store: Opener, clean) -> None:
    out_p = dataclasses.replace(OUT_P, esn=True)
    in_p = dataclasses.replace(IN_P, esn=True)
    tx = sender(start_seq=2**32 - 20, params=out_p)
    # an earlier run saw everything up to 2^32 - 20 (a fresh ESN window cannot place these)
    open_store().save_top(replay_fingerprint(in_p), 2**32 - 20, durable=True)
    rx = receiver(open_store(), params=in_p)
    before = send(tx, 10)  # 2^32 - 19 .. 2^32 - 10
    accept_all(rx, before)
    rx.handle_timer(0.0)  # saved below the boundary
    after = send(tx, 20)  # crosses into block 1: low halves 0, 1, ... repeat block 0's
    accept_all(rx, after)
    if clean:
        rx.flush()
    rx2 = receiver(open_store(), params=in_p)
    assert rx2.replay.top == (2**32 + 10 if clean else 2**32 - 10)
    assert replay_verdicts(rx2, before) == ["replay"] * 10
    expected_after = "replay" if clean else "ok"  # crash: block-1 packets are the residual
    assert replay_verdicts(rx2, after) == [expected_after] * 20
    fresh = send(tx, 3)
    accept_all(rx2, fresh)
    assert rx2.replay.top == 2**32 + 13  # high half inferred from the restored edge


def test_replay_id_covers_keys_spi_and_esn_not_addresses() -> None:
    rx_id = replay_fingerprint(IN_P)
    assert len(rx_id) == 32 and rx_id != sa_fingerprint(IN_P)
    assert replay_fingerprint(dataclasses.replace(IN_P, spi=0x2002)) != rx_id
    assert replay_fingerprint(dataclasses.replace(IN_P, esn=True)) != rx_id
    assert replay_fingerprint(dataclasses.replace(IN_P, enc_key=bytes(20))) != rx_id
    # outer addresses are not authenticated: a re-addressed SA keeps refusing old packets
    assert replay_fingerprint(dataclasses.replace(IN_P, src=B6, dst=A6)) == rx_id


# --- failures ------------------------------------------------------------------------------------


class FailingStore(MemorySeqReserver):
    def __init__(self) -> None:
        super().__init__()
        self.fail = True

    def save_top(self, rx_id: str, top: int, *, durable: bool) -> None:
        if self.fail:
            raise SeqStoreError("read-only file system")
        super().save_top(rx_id, top, durable=durable)


def test_failed_periodic_save_is_counted_and_retried_but_never_drops() -> None:
    store = FailingStore()
    rx = receiver(store, now=0.0)
    tx = sender()
    accept_all(rx, send(tx, 3), now=0.0)
    rx.handle_timer(0.0)
    assert rx.stats.replay_save_errors == 1
    assert rx.next_timer() == REPLAY_SAVE_INTERVAL  # retried after an interval, not in a loop
    accept_all(rx, send(tx, 3), now=0.5)  # traffic goes on
    store.fail = False
    rx.handle_timer(REPLAY_SAVE_INTERVAL)
    assert store.tops == {rx._rx_id: 6}


def test_failed_flush_raises_and_flush_all_still_flushes_the_others() -> None:
    bad, good = FailingStore(), MemorySeqReserver()
    rx_bad, rx_good = receiver(bad), receiver(good)
    accept_all(rx_bad, send(sender(), 2))
    accept_all(rx_good, send(sender(), 2))
    with pytest.raises(SeqStoreError, match="read-only"):
        rx_bad.flush()
    with pytest.raises(SeqStoreError, match="spi=0x1001"):
        flush_all([rx_bad, rx_good])
    assert good.synced_tops == {rx_good._rx_id: 2}


@pytest.mark.parametrize(
    "content", [b"", b"12\n", b"%020d" % 5, b"%021d\n" % 5, b"-" + b"1" * 19 + b"\n", b"x" * 21]
)
def test_corrupt_record_makes_the_sa_constructor_fail(tmp_path, content: bytes) -> None:
    d = tmp_path / "state"
    store = FileSeqReserver(d)
    (d / f"{replay_fingerprint(IN_P)}.replay").write_bytes(content)
    with pytest.raises(SeqStoreError, match="corrupt"):
        receiver(store)


def test_edge_beyond_the_32_bit_space_is_refused_without_esn() -> None:
    store = MemorySeqReserver()
    store.tops[replay_fingerprint(IN_P)] = 2**32
    with pytest.raises(SeqStoreError, match="out of range"):
        receiver(store)


# --- the file record ------------------------------------------------------------------------


def test_file_record_is_fixed_width_private_and_overwritten_in_place(tmp_path, monkeypatch) -> None:
    d = tmp_path / "state"
    store = FileSeqReserver(d)
    rx_id = "ab" * 16
    log: list[str] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda fd, n=name, f=real: (log.append(n), f(fd))[1])
    store.save_top(rx_id, 7, durable=False)  # first record: created crash-safely
    f = d / f"{rx_id}.replay"
    assert f.read_bytes() == b"%020d\n" % 7
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    assert log == ["fsync", "fsync"]  # tmp file, directory
    inode = os.stat(f).st_ino
    log.clear()
    store.save_top(rx_id, 2**64 - 1, durable=False)
    assert log == []  # periodic save: no sync at all
    assert f.read_bytes() == b"18446744073709551615\n" and os.stat(f).st_ino == inode
    store.save_top(rx_id, 2**64 - 1, durable=True)  # flush of an unsynced value: sync it
    assert log == ["fdatasync"]
    store.save_top(rx_id, 2**64 - 1, durable=True)
    store.save_top(rx_id, 3, durable=True)  # never lowered
    assert log == ["fdatasync"] and FileSeqReserver(d).load_top(rx_id) == 2**64 - 1
    assert sorted(os.listdir(d)) == [f"{rx_id}.replay"]


def test_file_record_deleted_under_us_is_recreated(tmp_path) -> None:
    d = tmp_path / "state"
    store = FileSeqReserver(d)
    store.save_top("cd" * 16, 5, durable=False)
    os.unlink(d / f"{'cd' * 16}.replay")
    store.save_top("cd" * 16, 6, durable=False)
    assert FileSeqReserver(d).load_top("cd" * 16) == 6


def test_outbound_marks_and_inbound_edges_do_not_collide(tmp_path) -> None:
    """Same keys both ways (a misconfiguration the setkey loader rejects) still cannot mix them."""
    d = tmp_path / "state"
    tx = SecurityAssociation(OUT_P, rand=os.urandom, reserver=FileSeqReserver(d), now=0.0)
    packets = send(tx, 3)
    rx = receiver(FileSeqReserver(d))
    accept_all(rx, packets)
    rx.flush()
    assert sorted(p.suffix for p in d.iterdir()) == [".replay", ".seq"]
    assert FileSeqReserver(d).load(tx.sa_id) == 4096
