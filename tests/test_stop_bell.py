"""The stop bell (app/stop_bell.py): a stop wakes a sleeping run thread directly, and a
drain's many wake-ups go out in a few chains, each woken sleeper ringing the next.

Threads are observed, never timed: each test waits for the sleepers to be asleep
(``StopBell.sleeping``), rings, and joins the threads with a bound that only a hang reaches.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import trio

from app.conversation import RunContext, RunControl
from app.stop_bell import BellRinger, StopBell

JOIN_SECONDS = 10.0  # a woken thread returns in microseconds; only a hang gets near this
LONG_SLEEP = 60.0


class Sleeper:
    """A thread sleeping on ``bell`` for :data:`LONG_SLEEP`; ``woken`` is what wait said."""

    def __init__(self, bell: StopBell) -> None:
        self.bell = bell
        self.woken: bool | None = None
        self.thread = threading.Thread(target=self._sleep, daemon=True)
        self.thread.start()

    def _sleep(self) -> None:
        self.woken = self.bell.wait(LONG_SLEEP)

    def until_asleep(self) -> None:
        """Return once the thread sleeps on the bell (polled: only a hang takes long)."""
        pause = threading.Event()
        for _ in range(int(JOIN_SECONDS * 1000)):
            if self.bell.sleeping:
                return
            pause.wait(0.001)
        raise AssertionError("the sleeper never fell asleep")

    def join(self) -> bool | None:
        self.thread.join(JOIN_SECONDS)
        assert not self.thread.is_alive(), "the sleeper was not woken"
        return self.woken


@pytest.fixture
def sleepers() -> Iterator[list[Sleeper]]:
    made: list[Sleeper] = []
    yield made
    for sleeper in made:  # never leave a thread asleep for a minute behind a failed test
        sleeper.bell.ring()
        sleeper.thread.join(JOIN_SECONDS)


def asleep(sleepers: list[Sleeper], count: int) -> list[Sleeper]:
    new = [Sleeper(StopBell()) for _ in range(count)]
    sleepers.extend(new)
    for sleeper in new:
        sleeper.until_asleep()
    return new


def test_stop_bell_ring_wakes_a_sleeping_thread(sleepers: list[Sleeper]) -> None:
    """A thread sleeping on the bell wakes when it rings, and says it was rung."""
    (sleeper,) = asleep(sleepers, 1)
    assert sleeper.bell.ring() is True  # it woke a sleeper
    assert sleeper.join() is True
    assert not sleeper.bell.sleeping


def test_stop_bell_rung_before_the_wait_does_not_wait() -> None:
    """Rung first (the stop came before the sleep): every wait returns at once, rung; a
    second ring wakes nobody and raises nothing."""
    bell = StopBell()
    assert bell.ring() is False  # nobody was asleep
    assert bell.wait(LONG_SLEEP) is True
    assert bell.wait(LONG_SLEEP) is True
    assert bell.ring() is False


def test_stop_bell_wait_that_times_out_says_not_rung() -> None:
    """A wait that runs its time says it was not rung; the bell holds no lock afterwards."""
    bell = StopBell()
    assert bell.wait(0.0) is False
    assert not bell.sleeping and not bell.rung


class RecordedBell(StopBell):
    """A bell that notes, in ``order``, each ring that finds a sleeper — before it wakes
    the sleeper, so the order is the order of the rings."""

    __slots__ = ("order",)

    def __init__(self, order: list[StopBell]) -> None:
        super().__init__()
        self.order = order

    def ring(self) -> bool:
        if self.sleeping:
            self.order.append(self)
        return super().ring()


def recorded_sleepers(sleepers: list[Sleeper], count: int, order: list[StopBell]) -> list[Sleeper]:
    new = [Sleeper(RecordedBell(order)) for _ in range(count)]
    sleepers.extend(new)
    for sleeper in new:
        sleeper.until_asleep()
    return new


async def test_bell_ringer_chain_wakes_each_sleeper_after_the_one_before(
    sleepers: list[Sleeper],
) -> None:
    """One chain: the ringer wakes the first sleeper, and each woken sleeper rings the
    next in line from its own thread — so every sleeper wakes, in line order, each rung
    only after the one before it woke."""
    order: list[StopBell] = []
    group = recorded_sleepers(sleepers, 6, order)
    ringer = BellRinger(window=1)
    ringer.ring_all(s.bell for s in group)
    with trio.fail_after(JOIN_SECONDS):
        await ringer.wait_all_rung()
    assert [s.join() for s in group] == [True] * 6
    assert order == [s.bell for s in group]


async def test_bell_ringer_starts_a_window_of_chains(sleepers: list[Sleeper]) -> None:
    """``window`` chains: the ringer itself rings the first ``window`` sleepers only; the
    others are rung by woken sleepers, and all wake."""
    order: list[StopBell] = []
    group = recorded_sleepers(sleepers, 5, order)
    ringer = BellRinger(window=2)
    calls: list[int] = []
    pass_on = ringer.pass_on

    def counted_pass_on() -> None:
        calls.append(threading.get_ident())
        pass_on()

    ringer.pass_on = counted_pass_on  # type: ignore[method-assign]
    ringer.ring_all(s.bell for s in group)
    assert [s.join() for s in group] == [True] * 5
    main = threading.get_ident()
    assert calls.count(main) == 2  # the ringer's own: one per chain
    assert sorted(order, key=id) == sorted((s.bell for s in group), key=id)


async def test_bell_ringer_does_not_count_bells_nobody_sleeps_on(sleepers: list[Sleeper]) -> None:
    """A bell without a sleeper (its thread is elsewhere: it will see the cancel through
    Trio) is rung on the way and takes no place in a chain."""
    idle = [StopBell() for _ in range(3)]
    group = asleep(sleepers, 2)
    BellRinger(window=1).ring_all([idle[0], group[0].bell, idle[1], idle[2], group[1].bell])
    assert [s.join() for s in group] == [True, True]
    assert [b.rung for b in idle] == [True, True, True]


def _context(control: RunControl) -> RunContext:
    """A run context with only what :meth:`RunContext.sleep` uses."""
    return RunContext(
        store=None,  # type: ignore[arg-type]
        conversation_id="c",
        run_id="r",
        agent_spec={},
        registry=None,  # type: ignore[arg-type]
        max_iterations=1,
        control=control,
        tools=None,  # type: ignore[arg-type]
        tool_env=None,  # type: ignore[arg-type]
    )


async def test_run_context_sleep_is_cut_short_only_by_a_cancel() -> None:
    """The bell rung while Trio reports no cancel (never done by a stop, which cancels
    first): the sleep is not cut short — the rest is slept on the Trio side."""
    control = RunControl()
    control.bell.ring()
    ctx = _context(control)
    began = trio.current_time()
    with trio.fail_after(JOIN_SECONDS):
        await trio.to_thread.run_sync(ctx.sleep, 0.05)
    assert trio.current_time() - began >= 0.05


async def test_run_context_sleep_raises_cancelled_when_stopped() -> None:
    """A stop (the scope cancelled, then the bell rung) ends the thread's sleep with
    ``trio.Cancelled``, and the host sees the cancel."""
    control = RunControl()
    ctx = _context(control)
    scope = trio.CancelScope()

    async def stop_when_asleep() -> None:
        while not control.bell.sleeping:
            await trio.sleep(0.001)
        scope.cancel()
        control.bell.ring()

    with trio.fail_after(JOIN_SECONDS):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_when_asleep)
            with scope:
                await trio.to_thread.run_sync(ctx.sleep, LONG_SLEEP)
    assert scope.cancelled_caught
