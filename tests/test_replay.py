"""Anti-replay window (RFC 4303 section 3.4.3) and ESN inference (RFC 4303 Appendix A)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bits.errors import ConfigError
from bits.replay import ReplayCheck, ReplayWindow

OK, DUP, OLD = ReplayCheck.OK, ReplayCheck.DUPLICATE, ReplayCheck.TOO_OLD

# Each row: (number, window size, sequence numbers committed first, seq to check, expected).
# Row numbers are stable so a failure names the case.
WINDOW_TABLE = [
    (1, 64, [], 1, OK),  # first packet
    (2, 64, [], 0, OLD),  # sequence number 0 is never sent (RFC 4303 3.3.3)
    (3, 64, [1], 1, DUP),  # plain duplicate
    (4, 64, [1], 2, OK),  # next in order
    (5, 64, [100], 37, OK),  # left edge: T - W + 1 = 37 is inside
    (6, 64, [100], 36, OLD),  # T - W = 36 is just outside
    (7, 64, [100, 37], 37, DUP),  # left edge, already seen
    (8, 64, [100], 99, OK),  # just left of T, unseen
    (9, 64, [100], 100, DUP),  # T itself
    (10, 64, [100], 10**6, OK),  # far ahead is acceptable (integrity decides)
    (11, 64, [5, 3], 4, OK),  # hole inside the window
    (12, 64, [5, 3], 3, DUP),  # reordered packet seen twice
    (13, 64, [5, 200], 5, OLD),  # slid past by a far jump
    (14, 64, [5, 68], 5, DUP),  # shift 63: 5 is still the left edge, and still marked
    (15, 64, [5, 69], 5, OLD),  # shift 64: out
    (16, 32, [40], 9, OK),  # minimum window: left edge T - W + 1 = 9
    (17, 32, [40], 8, OLD),  # T - W = 8
    (18, 32, [40, 9], 9, DUP),
    (19, 65536, [70000], 4464, OLD),  # maximum window: T - W = 4464
    (20, 65536, [70000], 4465, OK),  # left edge
    (21, 65536, [70000, 4465], 4465, DUP),
    (22, 0, [5], 5, OK),  # window disabled: duplicates pass (RFC 4303 3.4.3: receiver's choice)
    (23, 0, [5], 0, OLD),  # ... but 0 is still never valid
    (24, 64, [2**32 - 1], 2**32 - 1, DUP),  # top of the 32-bit space
    (25, 64, [2**32 - 1], 2**32 - 64, OK),
    (26, 64, [2**32 - 1], 2**32 - 65, OLD),
]


@pytest.mark.parametrize(
    "row,size,committed,seq,expected", WINDOW_TABLE, ids=[f"row{r[0]}" for r in WINDOW_TABLE]
)
def test_window_table(row: int, size: int, committed: list[int], seq: int, expected: ReplayCheck):
    w = ReplayWindow(size)
    for s in committed:
        assert w.check(s) is OK, f"row {row}: setup packet {s} rejected"
        w.commit(s)
    assert w.check(seq) is expected


def test_check_does_not_move_the_window() -> None:
    """Check-then-commit: a packet that fails integrity (no commit) leaves no trace."""
    w = ReplayWindow(64)
    w.commit(10)
    assert w.check(1000) is OK
    assert (w.top, w.bitmap) == (10, 1)
    assert w.check(9) is OK  # still acceptable: 1000 was never committed


def test_commit_after_window_moved_on_is_harmless() -> None:
    w = ReplayWindow(32)
    assert w.check(5) is OK
    w.commit(100)  # another packet authenticated meanwhile
    w.commit(5)  # 5 is now too old: nothing to record
    assert w.top == 100 and w.check(5) is OLD


@pytest.mark.parametrize("size", [1, 31, 65537, -1])
def test_window_size_limits(size: int) -> None:
    with pytest.raises(ConfigError):
        ReplayWindow(size)


# ESN inference, RFC 4303 Appendix A2.2 (esp.md section 4). Each row: (number, window, T, SeqL,
# expected full sequence number).
ESN_TABLE = [
    # case A: Tl >= W - 1, the window sits inside one 2^32 block
    (1, 64, 1000, 1001, 1001),  # right of T, same block
    (2, 64, 1000, 937, 937),  # left edge Tl - W + 1 = 937: same block
    (3, 64, 1000, 936, (1 << 32) | 936),  # left of the window: taken as the next block
    (4, 64, (5 << 32) | 2**32 - 1, 0, (6 << 32) | 0),  # rollover: SeqL 0 is in block Th + 1
    (5, 64, (5 << 32) | 2**32 - 1, 2**32 - 2, (5 << 32) | 2**32 - 2),  # just behind T, same block
    (6, 64, (5 << 32) | 63, 0, (5 << 32) | 0),  # Tl = W - 1: window [0, 63] in block 5
    # case B: Tl < W - 1, the window straddles the block boundary
    (7, 64, (5 << 32) | 10, 2**32 - 10, (4 << 32) | 2**32 - 10),  # in the window's tail: Th - 1
    (8, 64, (5 << 32) | 10, 11, (5 << 32) | 11),  # right of T: Th
    (9, 64, (5 << 32) | 10, 2**32 - 53, (4 << 32) | 2**32 - 53),  # left edge Tl - W + 1 mod 2^32
    (10, 64, (5 << 32) | 10, 2**32 - 54, (5 << 32) | 2**32 - 54),  # beyond the left edge: Th
    # start of the SA: T = 0, no block -1 exists
    (11, 64, 0, 1, 1),
    (12, 64, 0, 2**32 - 1, -1),  # would be block -1: rejected as too old
    (13, 64, 5, 2**32 - 3, -1),
]


@pytest.mark.parametrize(
    "row,size,top,seq_lo,expected", ESN_TABLE, ids=[f"esn{r[0]}" for r in ESN_TABLE]
)
def test_esn_inference_table(row: int, size: int, top: int, seq_lo: int, expected: int) -> None:
    w = ReplayWindow(size)
    if top:
        w.commit(top)
    assert w.infer(seq_lo) == expected


def test_esn_rollover_sequence() -> None:
    """A sender crossing 2^32 with some reordering: every packet is inferred right and accepted
    once, duplicates after the rollover are caught."""
    w = ReplayWindow(64)
    sent = list(range(2**32 - 40, 2**32 + 40))
    order = sent[:30] + sent[35:50] + sent[30:35] + sent[50:]  # five packets arrive late
    w.commit(2**32 - 41)
    for seq in order:
        full = w.infer(seq & 0xFFFFFFFF)
        assert full == seq
        assert w.check(full) is OK
        w.commit(full)
    for seq in sent[-60:]:
        assert w.check(w.infer(seq & 0xFFFFFFFF)) is DUP
    assert w.top == 2**32 + 39


def test_infer_without_window_uses_nearest_block() -> None:
    w = ReplayWindow(0)
    w.commit((3 << 32) | 5)
    assert w.infer(2**32 - 1) == (2 << 32) | 2**32 - 1  # just behind T, previous block
    assert w.infer(6) == (3 << 32) | 6


@given(
    size=st.sampled_from([32, 64, 100, 1024]),
    seqs=st.lists(st.integers(min_value=1, max_value=3000), min_size=1, max_size=200),
)
def test_window_matches_a_set_model(size: int, seqs: list[int]) -> None:
    """Property: the bit mask behaves like the obvious set-of-seen-numbers model."""
    w = ReplayWindow(size)
    seen: set[int] = set()
    top = 0
    for s in seqs:
        if s <= top - size:
            expected = OLD
        elif s in seen:
            expected = DUP
        else:
            expected = OK
        assert w.check(s) is expected
        if expected is OK:
            w.commit(s)
            seen.add(s)
            top = max(top, s)


# restore(T) after a restart (docs/esp.md section 2). Each row: (number, window, saved T, seq to
# check, expected). Every number <= T is refused, every number above it passes.
RESTORE_TABLE = [
    (1, 64, 100, 100, DUP),  # T itself
    (2, 64, 100, 99, DUP),  # inside the window: marked seen although it may never have arrived
    (3, 64, 100, 37, DUP),  # left edge T - W + 1
    (4, 64, 100, 36, OLD),  # T - W
    (5, 64, 100, 1, OLD),
    (6, 64, 100, 101, OK),  # the peer's next packet
    (7, 64, 100, 10**6, OK),
    (8, 64, 10, 1, DUP),  # T < W: the whole short history is marked
    (9, 64, 10, 11, OK),
    (10, 64, 0, 1, OK),  # nothing saved: a fresh window
    (11, 32, 2**32 - 1, 2**32 - 32, DUP),
    (12, 32, 2**32 - 1, 2**32 - 33, OLD),
    (13, 0, 100, 5, OK),  # window disabled: restore only keeps T for ESN inference
]


@pytest.mark.parametrize(
    "row,size,top,seq,expected", RESTORE_TABLE, ids=[f"restore{r[0]}" for r in RESTORE_TABLE]
)
def test_restore_table(row: int, size: int, top: int, seq: int, expected: ReplayCheck) -> None:
    w = ReplayWindow(size)
    w.restore(top)
    assert w.top == top
    assert w.check(seq) is expected


def test_restore_then_commit_slides_a_full_window() -> None:
    w = ReplayWindow(32)
    w.restore(1000)
    w.commit(1005)  # the gap 1001..1004 stays open, everything up to 1000 stays closed
    assert [w.check(s) for s in (1000, 1001, 1004, 1005, 1006)] == [DUP, OK, OK, DUP, OK]
    assert w.check(1005 - 32) is OLD


def test_restore_keeps_esn_inference_across_a_block_boundary() -> None:
    w = ReplayWindow(64)
    w.restore((1 << 32) | 3)  # saved just after the rollover
    assert w.infer(4) == (1 << 32) | 4
    assert w.infer(2**32 - 2) == 2**32 - 2  # behind T in block 0 ...
    assert w.check(w.infer(2**32 - 2)) is DUP  # ... and refused
    w2 = ReplayWindow(64)
    w2.restore(2**32 - 5)  # saved before the rollover, the peer has crossed since
    assert w2.infer(7) == (1 << 32) | 7


def test_restore_rejects_a_negative_edge() -> None:
    with pytest.raises(ValueError):
        ReplayWindow(64).restore(-1)
