"""The slot line: seats at once when it can, positions equal seating order, O(log n)."""

from __future__ import annotations

import trio

from app.handles import RunHandle
from app.slot_line import SlotLine


def handle(name: str) -> RunHandle:
    return RunHandle(name, f"c-{name}", previous=None)


async def test_slot_line_seats_while_slots_are_free_then_queues() -> None:
    """Admission seats runs at once up to the limit; later ones get positions 1, 2, …"""
    limiter = trio.CapacityLimiter(2)
    line = SlotLine(limiter)
    runs = [handle(str(i)) for i in range(4)]
    assert [line.admit(run) for run in runs] == [None, None, 1, 2]
    assert [run.holds_slot for run in runs] == [True, True, False, False]
    assert (line.seated, len(line), list(line)) == (2, 2, ["2", "3"])


async def test_slot_line_release_seats_the_head_and_everyone_moves_up() -> None:
    """A released slot goes to the head of the line in the same step."""
    limiter = trio.CapacityLimiter(1)
    line = SlotLine(limiter)
    first, second, third = handle("a"), handle("b"), handle("c")
    for run in (first, second, third):
        line.admit(run)
    line.release(first)
    assert (first.holds_slot, second.holds_slot, second.seated.is_set()) == (False, True, True)
    assert line.position("c") == 1
    assert limiter.borrowed_tokens == 1


async def test_slot_line_leaving_from_the_middle_keeps_the_order() -> None:
    """A run that leaves (cancelled while waiting) takes no slot; those behind move up."""
    line = SlotLine(trio.CapacityLimiter(0))  # admission paused: everyone waits
    for name in "abcd":
        line.admit(handle(name))
    line.leave("b")
    assert [line.position(name) for name in "abcd"] == [1, None, 2, 3]
    assert line.seated == 0


async def test_slot_line_raising_the_limit_fills_from_the_head() -> None:
    """``fill`` after raising the limit seats waiting runs in line order."""
    limiter = trio.CapacityLimiter(0)
    line = SlotLine(limiter)
    runs = [handle(name) for name in "abc"]
    for run in runs:
        line.admit(run)
    limiter.total_tokens = 2
    line.fill()
    assert [run.holds_slot for run in runs] == [True, True, False]
    assert line.position("c") == 1


async def test_slot_line_positions_in_a_long_line() -> None:
    """With 100,000 runs waiting, positions are exact at both ends and after departures
    (lookups bisect a sorted list of tickets instead of scanning the line)."""
    line = SlotLine(trio.CapacityLimiter(0))
    for i in range(100_000):
        line.admit(handle(str(i)))
    for i in range(0, 50_000, 2):
        line.leave(str(i))
    assert line.position("1") == 1
    assert line.position("49999") == 25_000
    assert line.position("99999") == 75_000
    assert len(line) == 75_000
