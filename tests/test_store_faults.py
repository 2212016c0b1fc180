"""The store on a disk that refuses: ``app/store/connections.py`` and ``app/store/faults.py``.

The faults are real (``tests/tiny_fs.py``): a full tmpfs, an ext4 mount the kernel made
read-only, SQLite's own progress handler aborting a ``ROLLBACK``. Tests that mount are
skipped with the reason where mounting is not permitted.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from app.errors import NotFound
from app.events import MessagePayload, Source
from app.lifecycle import Status, Trigger
from app.store import EventQuery, NewConversation, SqliteStore
from app.store.connections import Connections
from app.store.faults import StoreHealth, StoreUnavailable, is_storage_error
from app.store.sqlite import SqliteEngine
from tests.tiny_fs import TinyFs, ext4_image, tiny_tmpfs

FULL_MESSAGE = "database or disk is full"
FULL = f"{FULL_MESSAGE} (SQLITE_FULL)"


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[TinyFs]:
    with tiny_tmpfs(tmp_path / "data") as disk:
        yield disk


@pytest.fixture
def store(disk: TinyFs) -> Iterator[SqliteStore]:
    """A store on the tiny disk (closed before the disk is unmounted)."""
    store = SqliteStore(disk.path / "trellis.sqlite3")
    yield store
    store.close()


def open_connections(path: Path, **callbacks: Any) -> Connections:
    """Connections with an ``items`` table (``text`` unique) and no cache to refresh."""
    callbacks.setdefault("after_commit", lambda connection: None)
    conns = Connections(SqliteEngine(path), **callbacks)
    with conns.write() as connection:
        connection.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, text TEXT UNIQUE)")
    return conns


@pytest.fixture
def conns(disk: TinyFs) -> Iterator[Connections]:
    conns = open_connections(disk.path / "items.sqlite3")
    yield conns
    conns.close()


def insert(conns: Connections, text: str) -> None:
    with conns.write() as connection:
        connection.execute("INSERT INTO items (text) VALUES (?)", (text,))


def insert_then(conns: Connections, fail: Callable[[sqlite3.Connection], object]) -> None:
    """A write that inserts ``'half'`` and then calls ``fail``, which raises."""
    with conns.write() as connection:
        connection.execute("INSERT INTO items (text) VALUES ('half')")
        fail(connection)


def items(conns: Connections) -> list[str]:
    with conns.read() as connection:
        return [row["text"] for row in connection.execute("SELECT text FROM items ORDER BY id")]


def assert_storage_cause(error: StoreUnavailable, sqlite_error: str) -> None:
    """``error`` is the typed 503 that chains SQLite's original error ``sqlite_error``."""
    assert (error.status, error.code) == (503, "store_unavailable")
    assert isinstance(error.__cause__, sqlite3.OperationalError)
    assert error.__cause__.sqlite_errorname == sqlite_error
    assert error.detail == {"sqlite_error": sqlite_error}


def say(store: SqliteStore, conversation_id: str, text: str) -> int:
    return store.append_event(conversation_id, None, Source.USER, MessagePayload(text=text)).seq


def seqs(store: SqliteStore, conversation_id: str) -> list[int]:
    return [e.seq for e in store.search_events(conversation_id, EventQuery()).items]


def new(key: str | None = None) -> NewConversation:
    agent = {"kind": "script", "steps": []}
    return NewConversation(
        agent, "t", 5, initial_message="hello", idempotency_key=key, request_hash=key
    )


# -- the store on a full disk ----------------------------------------------------------


def test_store_full_disk_append_fails_cleanly_and_recovers(
    store: SqliteStore, disk: TinyFs
) -> None:
    """On a full disk an append raises StoreUnavailable, reads still work, and once space
    returns the same store appends the next seq."""
    conversation, _ = store.create_conversation(new())
    assert store.get_conversation(conversation.id).event_count == 1  # now cached
    disk.fill()
    with pytest.raises(StoreUnavailable, match=r"disk is full.*free space") as caught:
        say(store, conversation.id, "lost")
    assert_storage_cause(caught.value, "SQLITE_FULL")
    assert store.get_conversation(conversation.id).event_count == 1
    assert seqs(store, conversation.id) == [1]
    disk.free()
    assert say(store, conversation.id, "kept") == 2
    assert seqs(store, conversation.id) == [1, 2]
    assert store.get_conversation(conversation.id).event_count == 2


def test_store_full_disk_create_conversation_leaves_nothing_behind(
    store: SqliteStore, disk: TinyFs
) -> None:
    """A creation refused by a full disk leaves no conversation, event or idempotency key:
    after space returns, the same key creates a new conversation."""
    disk.fill()
    with pytest.raises(StoreUnavailable) as caught:
        store.create_conversation(new(key="k1"))
    assert_storage_cause(caught.value, "SQLITE_FULL")
    assert store.list_conversations(status=None, limit=10, cursor=None).items == []
    disk.free()
    conversation, created = store.create_conversation(new(key="k1"))
    assert created
    assert seqs(store, conversation.id) == [1]


def test_store_full_disk_run_end_is_recorded_once_space_returns(
    store: SqliteStore, disk: TinyFs
) -> None:
    """A run whose end the full disk refused stays running, takes its end once space
    returns, and its conversation then accepts a new run."""
    conversation, _ = store.create_conversation(new())
    store.create_run(conversation.id, run_id="r1", activate=True, reason="user")
    store.transition_run("r1", Trigger.START, reason="started")
    disk.fill()
    with pytest.raises(StoreUnavailable):
        store.transition_run("r1", Trigger.FAIL, reason="agent_error", error="boom")
    assert store.get_run(conversation.id, "r1").status is Status.RUNNING
    disk.free()
    run = store.transition_run("r1", Trigger.FAIL, reason="agent_error", error="boom")
    assert (run.status, run.error) == (Status.ERROR, "boom")
    store.create_run(conversation.id, run_id="r2", activate=True, reason="user")
    assert store.get_conversation(conversation.id).status is Status.QUEUED


# -- Connections: health and probe -----------------------------------------------------


def test_connections_health_reports_full_disk_until_a_probe_succeeds(
    conns: Connections, disk: TinyFs
) -> None:
    """A storage error makes health() report it with its time; probes keep counting while
    the disk is full, and the first probe after space returns makes it ok again."""
    insert(conns, "before")
    disk.fill()
    with pytest.raises(StoreUnavailable):
        insert(conns, "lost")
    failed = conns.health()
    assert (failed.ok, failed.error, failed.failures) == (False, FULL, 1)
    assert failed.failing_since is not None and failed.failing_since == failed.last_failure_at
    assert items(conns) == ["before"]
    probed = conns.probe()
    assert (probed.ok, probed.failures, probed.failing_since) == (False, 2, failed.failing_since)
    assert probed.last_failure_at is not None and probed.last_failure_at >= failed.failing_since
    disk.free()
    assert conns.probe() == StoreHealth() == conns.health()
    with conns.read() as connection:
        assert connection.execute("SELECT count(*) FROM health_probe").fetchone()[0] == 1


def test_connections_successful_write_clears_health(conns: Connections, disk: TinyFs) -> None:
    """After space returns, the next write succeeds on the same writer and clears health;
    the refused write left nothing."""
    disk.fill()
    with pytest.raises(StoreUnavailable):
        insert(conns, "lost")
    disk.free()
    insert(conns, "kept")
    assert conns.health() == StoreHealth()
    assert items(conns) == ["kept"]


def test_connections_read_only_filesystem_reports_unavailable(tmp_path: Path) -> None:
    """When the kernel remounts the filesystem read-only under the open database, writes
    raise StoreUnavailable (SQLITE_IOERR_WRITE), health says so, and reads keep working."""
    with (
        ext4_image(tmp_path / "ext4", tmp_path / "ext4.img") as ext4,
        closing(open_connections(ext4.path / "items.sqlite3")) as conns,
    ):
        insert(conns, "before")
        ext4.break_()
        with pytest.raises(StoreUnavailable, match="read-write") as caught:
            insert(conns, "lost")
        assert_storage_cause(caught.value, "SQLITE_IOERR_WRITE")
        assert conns.health().error == "disk I/O error (SQLITE_IOERR_WRITE)"
        assert items(conns) == ["before"]
        assert conns.probe().failures == 2


# -- Connections: rollback, errors, after-commit ---------------------------------------


def test_connections_failed_rollback_keeps_the_original_error_and_a_usable_writer(
    conns: Connections,
) -> None:
    """When ROLLBACK itself fails, the block's own error propagates (noted), the transaction
    is discarded, and the next write works."""
    original = LookupError("the block's own error")

    def break_rollback_and_fail(connection: sqlite3.Connection) -> None:
        connection.set_progress_handler(lambda: 1, 1)  # SQLite aborts every statement now
        raise original

    with pytest.raises(LookupError) as caught:
        insert_then(conns, break_rollback_and_fail)
    assert caught.value is original
    assert "ROLLBACK failed too (interrupted (SQLITE_INTERRUPT))" in caught.value.__notes__[0]
    insert(conns, "after")
    assert items(conns) == ["after"]
    assert conns.health().ok


def raise_not_found(connection: sqlite3.Connection) -> None:
    raise NotFound("gone")


@pytest.mark.parametrize(
    ("fail_in_block", "expected"),
    [
        pytest.param(
            lambda c: c.execute("INSERT INTO items (text) VALUES ('x')"),
            sqlite3.IntegrityError,
            id="constraint",
        ),
        pytest.param(
            lambda c: c.execute("SELECT * FROM no_such_table"),
            sqlite3.OperationalError,
            id="sql",
        ),
        pytest.param(raise_not_found, NotFound, id="trellis-error"),
    ],
)
def test_connections_other_errors_pass_through_and_keep_health(
    conns: Connections,
    fail_in_block: Callable[[sqlite3.Connection], object],
    expected: type[Exception],
) -> None:
    """Errors that are not storage faults propagate unchanged, roll back the block, and
    leave health ok."""
    insert(conns, "x")
    with pytest.raises(expected) as caught:
        insert_then(conns, fail_in_block)
    assert type(caught.value) is expected
    assert conns.health() == StoreHealth()
    insert(conns, "after")
    assert items(conns) == ["x", "after"]


def test_connections_after_commit_failure_does_not_fail_the_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A committed write whose cache refresh raised is reported as done; the failure is
    logged and on_cache_error is called, once."""
    refreshes: list[int] = []
    cache_errors: list[int] = []

    def refresh(connection: sqlite3.Connection) -> None:
        refreshes.append(1)
        if len(refreshes) == 2:  # the first write after the table was created
            raise RuntimeError("refresh failed")

    conns = open_connections(
        tmp_path / "items.sqlite3",
        after_commit=refresh,
        on_cache_error=lambda: cache_errors.append(1),
    )
    with closing(conns), caplog.at_level(logging.ERROR, logger="trellis.store"):
        insert(conns, "committed")
        assert items(conns) == ["committed"]
        assert cache_errors == [1]
        assert "cache refresh after a committed write failed" in caplog.text
        insert(conns, "next")
        assert (len(refreshes), cache_errors) == (3, [1])


def test_connections_read_that_cannot_end_is_closed_not_pooled(conns: Connections) -> None:
    """A read whose transaction cannot be ended keeps its own error and never returns to
    the pool, so the next read gets a connection that works."""

    def read_and_fail() -> None:
        with conns.read() as connection:
            connection.set_progress_handler(lambda: 1, 1)  # ending the read now fails too
            raise KeyError("the read's own error")

    with pytest.raises(KeyError, match="the read's own error"):
        read_and_fail()
    assert items(conns) == []


# -- which errors are storage errors ---------------------------------------------------


def readonly_error(tmp_path: Path) -> BaseException:
    """The real SQLITE_READONLY of a write on a connection opened read-only."""
    sqlite3.connect(tmp_path / "ro.sqlite3").close()
    with closing(sqlite3.connect(f"file:{tmp_path / 'ro.sqlite3'}?mode=ro", uri=True)) as ro:
        try:
            ro.execute("CREATE TABLE t (x)")
        except sqlite3.OperationalError as error:
            return error
    raise AssertionError("a read-only connection wrote")


def sql_error(tmp_path: Path) -> BaseException:
    with closing(sqlite3.connect(tmp_path / "x.sqlite3")) as connection:
        try:
            connection.execute("SELECT * FROM no_such_table")
        except sqlite3.OperationalError as error:
            return error
    raise AssertionError("selected from a missing table")


@pytest.mark.parametrize(
    ("make_error", "expected"),
    [
        pytest.param(readonly_error, True, id="sqlite-readonly"),
        pytest.param(sql_error, False, id="sqlite-no-such-table"),
        pytest.param(
            lambda _: sqlite3.OperationalError("database or disk is full"), True, id="msg"
        ),
        pytest.param(lambda _: sqlite3.IntegrityError("UNIQUE constraint failed"), False, id="uq"),
        pytest.param(lambda _: OSError(errno.ENOSPC, "No space left"), True, id="enospc"),
        pytest.param(lambda _: OSError(errno.EROFS, "Read-only"), True, id="erofs"),
        pytest.param(lambda _: OSError(errno.ENOENT, "No such file"), False, id="enoent"),
        pytest.param(lambda _: NotFound("gone"), False, id="trellis-error"),
    ],
)
def test_is_storage_error_classifies_real_errors(
    tmp_path: Path, make_error: Callable[[Path], BaseException], expected: bool
) -> None:
    """Full, I/O and read-only faults (by SQLite code, message or errno) are storage errors;
    SQL, constraint and Trellis errors are not."""
    assert is_storage_error(make_error(tmp_path)) is expected
