"""Burrow's rules, table-driven: each row is a window of (time, offset, lag), the current lag,
the evaluation time, and the status Burrow gives it."""

from __future__ import annotations

import pytest

from pipeline.lag.status import Entry, Status, Window, evaluate, worst


def w(*rows: tuple[float, int, int]) -> list[Entry]:
    return [Entry(t, o, lag) for t, o, lag in rows]


CASES = [
    # name, window, current lag, now, expected
    ("empty window", [], 5, 10, Status.OK),
    ("no lag now", w((0, 10, 5), (1, 10, 5)), 0, 2, Status.OK),
    ("lag zero once in the window", w((0, 10, 0), (1, 10, 4), (2, 10, 9)), 9, 2, Status.OK),
    ("caught up and still going", w((0, 10, 3), (1, 20, 2), (2, 30, 1)), 1, 2, Status.OK),
    ("lag falls somewhere", w((0, 10, 3), (1, 20, 5), (2, 30, 4), (3, 40, 6)), 6, 3, Status.OK),
    ("offset goes backwards", w((0, 50, 5), (1, 60, 5), (2, 20, 45)), 45, 2, Status.REWIND),
    ("rewind outranks stop", w((0, 50, 5), (1, 20, 45)), 45, 100, Status.REWIND),
    ("silent longer than the window's span", w((0, 10, 5), (1, 11, 5), (2, 12, 6)), 9, 4.5, Status.STOP),
    ("silent exactly the span is not yet stop", w((0, 10, 5), (1, 11, 5), (2, 12, 6)), 9, 4, Status.WARN),
    ("one entry, time has passed", w((0, 10, 5)), 5, 1, Status.STOP),
    ("one entry, just taken", w((0, 10, 5)), 5, 0, Status.OK),
    ("stop outranks stall", w((0, 10, 5), (1, 10, 6)), 8, 5, Status.STOP),
    ("offsets never move", w((0, 10, 5), (1, 10, 6), (2, 10, 7)), 7, 2, Status.STALL),
    ("stalled with lag steady", w((0, 10, 5), (1, 10, 5)), 5, 1, Status.STALL),
    ("advancing, lag never falls", w((0, 10, 5), (1, 15, 5), (2, 20, 8)), 8, 2, Status.WARN),
]
# Partitions no live member owns: a backlog that outlasts the window is STOP even when the
# window still shows the zero lag of before the consumer died (Burrow would say OK).
UNOWNED = [
    ("died caught up, backlog older than the window", w((0, 10, 0), (1, 12, 0)), 7, 3, Status.STOP),
    ("died caught up, not yet the window's span", w((0, 10, 0), (1, 12, 0)), 7, 2, Status.OK),
    ("nobody there and nothing waiting", w((0, 10, 0), (1, 12, 0)), 0, 9, Status.OK),
    ("nobody there, rewound before leaving", w((0, 50, 5), (1, 20, 45)), 45, 1.5, Status.REWIND),
]


@pytest.mark.parametrize(("name", "window", "lag", "now", "expected"), CASES, ids=[c[0] for c in CASES])
def test_evaluate(name: str, window: list[Entry], lag: int, now: float, expected: Status) -> None:
    assert evaluate(window, lag, now) is expected


@pytest.mark.parametrize(("name", "window", "lag", "now", "expected"), UNOWNED, ids=[c[0] for c in UNOWNED])
def test_evaluate_unowned(name: str, window: list[Entry], lag: int, now: float, expected: Status) -> None:
    assert evaluate(window, lag, now, owned=False) is expected


def test_group_takes_the_worst_partition() -> None:
    assert worst([Status.OK, Status.STALL, Status.WARN]) is Status.STALL
    assert worst([Status.STOP, Status.REWIND]) is Status.REWIND
    assert worst([]) is Status.OK


def test_window_counts_only_moves_or_live_owners() -> None:
    win = Window(size=3)
    win.observe(0, 10, 5, owned=True)
    win.observe(1, 10, 6, owned=True)  # owner alive, offset unchanged: a commit that did not move
    assert win.status(1) is Status.STALL
    win.observe(2, 10, 7, owned=False)  # nobody owns it and nothing moved: no entry
    win.observe(3, 10, 8, owned=False)
    assert [e.time for e in win.entries] == [0, 1]
    assert win.status(2) is Status.STALL  # silent 1 s, span 1 s: not yet
    assert win.status(3) is Status.STOP
    win.observe(4, 20, 0, owned=True)
    assert win.status(4) is Status.OK
    win.observe(5, 21, 3, owned=True)
    assert len(win.entries) == 3  # the window slides
    assert win.entries[0].time == 1


def test_window_refuses_a_single_entry_size() -> None:
    with pytest.raises(ValueError, match="two entries"):
        Window(size=1)


def test_window_of_a_consumer_that_died_caught_up() -> None:
    win = Window(size=3)
    for t in range(3):
        win.observe(t, 10 * t, 0, owned=True)  # keeping up
    win.observe(3, 20, 5, owned=False)  # gone; mail keeps arriving
    assert win.status(3) is Status.OK  # silent 1 s of a 2 s span
    win.observe(5, 20, 9, owned=False)
    assert win.status(5) is Status.STOP
