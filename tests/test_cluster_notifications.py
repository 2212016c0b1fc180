"""LISTEN/NOTIFY into Trio (app/cluster/notifications.py), against a real PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest
import trio
import trio.testing

from app.cluster.notifications import Listener, Notification, notify


class Inbox:
    """What a listener delivered: every batch, and an event per arrival."""

    def __init__(self) -> None:
        self.batches: list[list[Notification]] = []
        self.arrived = trio.Event()

    def deliver(self, batch: list[Notification]) -> None:
        self.batches.append(batch)
        self.arrived.set()

    @property
    def received(self) -> list[Notification]:
        return [note for batch in self.batches for note in batch]

    async def wait_for(self, count: int) -> list[Notification]:
        while len(self.received) < count:
            self.arrived = trio.Event()
            await self.arrived.wait()
        return self.received


@pytest.fixture
def sender(postgres_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        yield connection


def listening_threads() -> list[threading.Thread]:
    """Threads running the listener's loop (a Trio worker thread is named after the
    function it runs while it runs it)."""
    return [thread for thread in threading.enumerate() if thread.name.startswith("_listen ")]


async def test_notifications_arrive_in_order_and_only_on_listened_channels(
    postgres_url: str, sender: psycopg.Connection[tuple[object, ...]]
) -> None:
    inbox = Inbox()
    listener = Listener(postgres_url, ["trellis_a", "trellis_b"], inbox.deliver)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(listener.serve)
            # Sent at once after start: LISTEN was in place before ``started``.
            for n in range(50):
                notify(sender, "trellis_a" if n % 2 else "trellis_b", str(n))
                notify(sender, "trellis_other", str(n))
            received = await inbox.wait_for(50)
            nursery.cancel_scope.cancel()
    assert [note.payload for note in received] == [str(n) for n in range(50)]
    assert {note.channel for note in received} == {"trellis_a", "trellis_b"}


async def test_a_burst_is_delivered_in_few_batches(
    postgres_url: str, sender: psycopg.Connection[tuple[object, ...]]
) -> None:
    """One hop into Trio per batch, not per notification: a burst sent in one transaction
    arrives while no delivery runs, so it is handed over together."""
    inbox = Inbox()
    listener = Listener(postgres_url, ["trellis_burst"], inbox.deliver)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(listener.serve)
            with sender.transaction():  # delivered together, at COMMIT
                for n in range(200):
                    notify(sender, "trellis_burst", str(n))
            received = await inbox.wait_for(200)
            nursery.cancel_scope.cancel()
    assert [note.payload for note in received] == [str(n) for n in range(200)]
    assert len(inbox.batches) < 200


async def test_cancelling_joins_the_listening_thread(postgres_url: str) -> None:
    listener = Listener(postgres_url, ["trellis_idle"], Inbox().deliver)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(listener.serve)
            await trio.testing.wait_all_tasks_blocked()
            assert len(listening_threads()) == 1
            nursery.cancel_scope.cancel()
    assert listening_threads() == []  # serve returned only once its thread had


async def test_a_broken_connection_reconnects_and_says_so(
    postgres_url: str, sender: psycopg.Connection[tuple[object, ...]]
) -> None:
    """The server ends the listening session: the listener connects again, calls
    ``on_reconnect`` (notifications sent meanwhile are lost: its owner re-reads), and
    notifications sent after that arrive."""
    inbox = Inbox()
    reconnected = trio.Event()
    listener = Listener(postgres_url, ["trellis_r"], inbox.deliver, on_reconnect=reconnected.set)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(listener.serve)
            notify(sender, "trellis_r", "before")
            await inbox.wait_for(1)
            terminated = sender.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE pid <> pg_backend_pid() AND query LIKE 'LISTEN%%'"
                " AND datname = current_database()"
            ).fetchall()
            assert terminated == [(True,)]
            await reconnected.wait()
            notify(sender, "trellis_r", "after")
            received = await inbox.wait_for(2)
            nursery.cancel_scope.cancel()
    assert [note.payload for note in received] == ["before", "after"]


async def test_a_failing_delivery_is_logged_not_fatal(
    postgres_url: str,
    sender: psycopg.Connection[tuple[object, ...]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    inbox = Inbox()

    def deliver(batch: list[Notification]) -> None:
        if any(note.payload == "bad" for note in batch):
            raise ValueError("cannot take it")
        inbox.deliver(batch)

    listener = Listener(postgres_url, ["trellis_f"], deliver)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(listener.serve)
            notify(sender, "trellis_f", "bad")
            while "delivering" not in caplog.text:
                await trio.sleep(0.01)
            notify(sender, "trellis_f", "good")
            received = await inbox.wait_for(1)
            nursery.cancel_scope.cancel()
    assert [note.payload for note in received] == ["good"]
