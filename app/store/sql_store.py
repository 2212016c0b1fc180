"""The store's logic, written once for every engine: :class:`SqlStore`.

:class:`~app.store.sqlite.SqliteStore` (one SQLite file) and
:class:`~app.store.postgres.PostgresStore` (a PostgreSQL database) are this class on their
engine (``app/store/engine.py``: connections, error kinds, the SQL that differs). The SQL
here and in the modules it uses (``queries.py``, ``run_rows.py``, ``appends.py``,
``idempotency.py``) is written once, with ``?`` placeholders.

Threads and connections: see ``app/store/connections.py`` (one writer under a lock, a pool
of readers). Every public method is thread-safe and atomic: one transaction, which
``append_event`` and ``save_progress`` may share with other threads' writes (group commit,
``app/store/group_commit.py``; each is still all-or-nothing and committed when it returns).
Any thread may call any method: handlers call from I/O-limiter threads, runs from their own
run thread.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

from app.errors import NotFound
from app.events import (
    Event,
    MessagePayload,
    Payload,
    Source,
    utc_now,
)
from app.lifecycle import ACTIVE, Status, Trigger
from app.principal import DEFAULT_TENANT
from app.records import ConversationRecord, RunRecord
from app.store import queries
from app.store.appends import NewEvent, insert_event
from app.store.base import (
    ConversationPage,
    EventPage,
    EventQuery,
    MessageWritten,
    NewConversation,
    NewRun,
)
from app.store.cache import RecordCache
from app.store.change_notes import change_notes
from app.store.claims import QueueRows
from app.store.connections import Connections
from app.store.engine import Connection, Engine
from app.store.faults import StoreHealth
from app.store.idempotency import Answer, IdempotentWrite, check_key, purge_keys, save_key
from app.store.run_rows import IDS_PER_QUERY, RunRows

R = TypeVar("R")

#: The most cached conversations a commit re-reads; beyond, it drops them from the cache.
_REFRESH_AT_MOST = 64

#: Runs stopped per transaction by crash recovery: one transaction for any realistic crash
#: (recovering 10,000 runs took 2.1-2.4 s here, two runs), chunked beyond so that no
#: transaction grows unbounded.
_RUNS_PER_RECOVERY = 20_000


def _new_id() -> str:
    return str(uuid.uuid4())


class SqlStore:
    """The :class:`~app.store.base.EventStore` on an engine's database (schema created or
    migrated when it opens; the engine is closed by :meth:`close`)."""

    #: The database URL other nodes share (PostgreSQL), or ``None`` (SQLite: one process
    #: owns the file). A supervisor on a store with one runs as a cluster node
    #: (``app/cluster/node.py``).
    cluster_url: str | None = None
    #: The LISTEN/NOTIFY channel of this database's change notes (PostgreSQL; set on
    #: opening), or ``None``: see ``app/store/change_notes.py``.
    changes_channel: str | None = None

    def __init__(self, engine: Engine, *, group_commit: bool = True) -> None:
        """``group_commit=False``: one transaction per write (a benchmark's baseline)."""
        #: This process's id among the nodes sharing the database: new for every store
        #: opened (a restarted process is a new node; its old runs are recovered as a
        #: dead node's).
        self.node_id = uuid.uuid4().hex[:12]
        self._dialect = engine.dialect
        self._cache = RecordCache()
        self._touched: set[str] = set()  # conversations the current write transaction changed
        self._appended: list[Event] = []  # events the current write transaction appended
        self._listeners: list[Callable[[list[Event]], None]] = []
        #: On a shared database runs are queued in it and claimed (app/store/claims.py).
        self._runs = (
            RunRows(self._touched, self._append)
            if self.cluster_url is None
            else QueueRows(self._touched, self._append, self.node_id)
        )
        self._db = Connections(
            engine,
            after_commit=self._refresh_cached,
            on_cache_error=self._cache.clear,
            on_begin=self._begin,
            before_commit=self._announce,
            group_commit=group_commit,
        )

    def close(self) -> None:
        """Close every connection this store opened, from any thread."""
        self._db.close()

    def health(self) -> StoreHealth:
        """Whether the last write failed for a storage reason. Never blocks."""
        return self._db.health()

    def probe(self) -> StoreHealth:
        """Try a tiny write (blocking) and report the health it leaves."""
        return self._db.probe()

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._db.read() as connection:
            yield connection

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._db.write() as connection:
            yield connection

    def _submit(self, work: Callable[[Connection], R]) -> R:
        """Run ``work`` as a group-committed write (``Connections.submit``): it may share
        its transaction with other threads' writes. The events a failing ``work`` appended
        are forgotten with it (it was rolled back alone)."""

        def guarded(connection: Connection) -> R:
            mark = len(self._appended)
            try:
                return work(connection)
            except BaseException:
                del self._appended[mark:]
                raise

        return self._db.submit(guarded)

    def _begin(self) -> None:
        """A write transaction began (write lock held): nothing touched or appended yet."""
        self._touched.clear()
        self._appended.clear()

    def _announce(self, connection: Connection) -> None:
        """Before ``COMMIT`` (write lock held): the change notes of what this transaction
        changed, for the other nodes (``app/store/change_notes.py``; none on SQLite)."""
        notify, channel = self._dialect.notify_changes, self.changes_channel
        if notify is not None and channel is not None and self._touched:
            notes = change_notes(self.node_id, self._touched, self._appended)
            connection.execute(notify, (channel, notes))

    def forget_cached(self, conversation_ids: Iterable[str] | None) -> None:
        """Drop these conversations' cached records (``None``: every record) because
        another node changed them; their next reader reads them again. Takes the write
        lock (``app/store/cache.py``), so blocks briefly: call it from a worker thread."""
        with self._db.write_lock():
            if conversation_ids is None:
                self._cache.clear()
            else:
                for conversation_id in conversation_ids:
                    self._cache.drop(conversation_id)

    def add_listener(self, listener: Callable[[list[Event]], None]) -> None:
        """Call ``listener(events)`` after every commit that appended events, in commit
        order, with the write lock held: it must not block (hand the events off). Events
        of a transaction that rolled back are never seen."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[list[Event]], None]) -> None:
        self._listeners.remove(listener)

    def _refresh_cached(self, writer: Connection) -> None:
        """After a commit (write lock held): tell listeners about the new events, then
        re-read the touched conversations that are cached, or drop them if they are gone.

        A big transaction (a drain's ``stop_runs``, a batch of many runs' appends) drops
        them instead (more than :data:`_REFRESH_AT_MOST`): re-reading and validating
        10,000 records held the write lock for most of a drain, and a dropped record is
        simply read again by its next reader."""
        if self._appended:
            events = list(self._appended)
            for listener in list(self._listeners):
                listener(events)
        cached = [
            conversation_id for conversation_id in self._touched if conversation_id in self._cache
        ]
        if len(cached) > _REFRESH_AT_MOST:
            for conversation_id in cached:
                self._cache.drop(conversation_id)
            return
        for conversation_id in cached:
            row = queries.conversation_row(writer, conversation_id)
            if row is None:
                self._cache.drop(conversation_id)
            else:
                self._cache.put(queries.conversation_from_row(row))

    # -- conversations -----------------------------------------------------------------

    def create_conversation(
        self,
        new: NewConversation,
        answer: Callable[[ConversationRecord], Answer] | None = None,
    ) -> tuple[ConversationRecord, bool]:
        """Create a conversation, its first user message and (``new.run``) its first run,
        in one transaction; ``False`` on a key replay that has no stored answer.

        With ``new.idempotency_key``, the key is stored with the conversation, and so is
        ``answer(record)`` when given.

        Errors:
            :class:`~app.store.idempotency.Replayed` when the key was used for this same
            request and its answer was stored; :class:`~app.errors.IdempotencyKeyReused`
            when it was used for another request.
        """
        key, request_hash = new.idempotency_key, new.request_hash or ""
        with self._write() as conn:
            if key is not None:
                existing = check_key(conn, key, request_hash)
                if existing is not None:
                    return self._conversation(conn, existing), False
            conversation_id = new.id or _new_id()
            now = utc_now().isoformat()
            conn.execute(
                "INSERT INTO conversations (id, tenant, title, status, agent, max_iterations,"
                " workspace, created_at, updated_at, webhook)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    conversation_id,
                    new.tenant,
                    new.title,
                    Status.IDLE.value,
                    json.dumps(new.agent),
                    new.max_iterations,
                    new.workspace,
                    now,
                    now,
                    None if new.webhook is None else new.webhook.model_dump_json(),
                ),
            )
            if new.initial_message is not None:
                message = MessagePayload(text=new.initial_message)
                self._append(conn, conversation_id, None, Source.USER, message)
            if new.run is not None:
                self._runs.insert(conn, self._conversation(conn, conversation_id), new.run)
            record = self._conversation(conn, conversation_id)
            if key is not None:
                stored = answer(record) if answer is not None else None
                save_key(conn, key, request_hash, conversation_id, now, stored)
            return record, True

    def check_idempotency_key(self, key: str, request_hash: str) -> None:
        """Raise what a keyed write with this key would raise, without writing.

        Errors: :class:`~app.store.idempotency.Replayed`,
        :class:`~app.errors.IdempotencyKeyReused`.
        """
        with self._read() as conn:
            check_key(conn, key, request_hash)

    def purge_idempotency_keys(self, created_before: str, key: str | None = None) -> int:
        """Delete keys older than ``created_before`` (or just ``key``, if it is); their
        conversations stay. Returns how many were deleted (see ``purge_keys``)."""
        with self._write() as conn:
            return purge_keys(conn, created_before, key)

    def get_conversation(self, conversation_id: str) -> ConversationRecord:
        """The conversation, from the cache or read (and cached) under the write lock."""
        cached = self._cache.get(conversation_id)
        if cached is not None:
            return cached
        with self._db.locked_writer() as writer:  # no write commits between read and insert
            record = self._conversation(writer, conversation_id)
            self._cache.put(record)
        return record

    def cached_conversation(self, conversation_id: str) -> ConversationRecord | None:
        """The cached record, or ``None``. Never blocks: safe on the Trio thread."""
        return self._cache.get(conversation_id)

    def list_conversations(
        self, *, status: Status | None, limit: int, cursor: str | None, tenant: str | None = None
    ) -> ConversationPage:
        """Summaries, newest first; ``cursor`` is the ``next_cursor`` of the previous page;
        only the conversations of ``tenant`` when given (filtered in the query).

        A row that cannot be rendered is listed as an ``UnreadableConversation``; a page
        ends early rather than pass ``queries.MAX_LIST_PAGE_BYTES``.
        """
        with self._read() as conn:
            rows = queries.list_summaries(
                conn, self._dialect, status, limit + 1, queries.parse_cursor(cursor), tenant
            )
        return queries.summary_page(rows, limit)

    def delete_conversation(self, conversation_id: str) -> None:
        """Delete the conversation with its runs and events (the caller stopped its runs)."""
        with self._write() as conn:
            self._touched.add(conversation_id)
            if (
                conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount
                == 0
            ):
                raise conversation_not_found(conversation_id)

    def get_agent_state(self, conversation_id: str) -> dict[str, Any]:
        with self._read() as conn:
            row = conn.execute(
                "SELECT agent_state FROM conversations WHERE id = ?", (conversation_id,)
            ).fetchone()
        if row is None:
            raise conversation_not_found(conversation_id)
        state: dict[str, Any] = json.loads(row["agent_state"])
        return state

    def count_conversations_with_workspace(self, name: str, tenant: str = DEFAULT_TENANT) -> int:
        """How many conversations of ``tenant`` name the workspace ``name`` (active or not).
        A conversation working in a directory of its own (no name given) is not counted."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT count(*) FROM conversations WHERE workspace = ? AND tenant = ?",
                (name, tenant),
            ).fetchone()
        return int(row[0])

    def _conversation(self, conn: Connection, conversation_id: str) -> ConversationRecord:
        row = queries.conversation_row(conn, conversation_id)
        if row is None:
            raise conversation_not_found(conversation_id)
        return queries.conversation_from_row(row)

    # -- runs --------------------------------------------------------------------------

    def create_run(
        self,
        conversation_id: str,
        *,
        run_id: str,
        activate: bool,
        reason: str,
        idempotent: IdempotentWrite[RunRecord] | None = None,
        started: bool = False,
    ) -> tuple[RunRecord, ConversationRecord]:
        """Record a new ``queued`` run; with ``activate`` it becomes the conversation's run,
        and with ``started`` (see :class:`~app.store.base.NewRun`) also ``running``.

        Returns the run and the conversation as they are after the change. A run created
        behind an earlier active run of the same conversation is activated later
        (:meth:`activate_run`), when that run has ended. With ``idempotent``, the key and
        the answer rendered from the run are stored in the same transaction.

        Errors: as :meth:`create_conversation` for the key; NotFound; IllegalTransition.
        """
        with self._write() as conn:
            if idempotent is not None:
                check_key(conn, idempotent.key, idempotent.request_hash)
            conversation = self._conversation(conn, conversation_id)
            new = NewRun(run_id, reason, activate, started)
            run = self._runs.insert(conn, conversation, new)
            if idempotent is not None:
                self._save_answer(conn, idempotent, conversation_id, run)
            return run, self._conversation(conn, conversation_id)

    def _save_answer(
        self,
        conn: Connection,
        idempotent: IdempotentWrite[R],
        conversation_id: str,
        result: R,
    ) -> None:
        now = utc_now().isoformat()
        answer = idempotent.answer(result)
        save_key(conn, idempotent.key, idempotent.request_hash, conversation_id, now, answer)

    def get_runs(self, run_ids: list[str]) -> list[RunRecord]:
        """The runs with these ids that exist, in the order given."""
        by_id: dict[str, RunRecord] = {}
        with self._read() as conn:
            for start in range(0, len(run_ids), IDS_PER_QUERY):
                chunk = run_ids[start : start + IDS_PER_QUERY]
                marks = ", ".join("?" * len(chunk))
                rows = conn.execute(f"SELECT * FROM runs WHERE id IN ({marks})", chunk)
                by_id.update((row["id"], queries.run_from_row(row)) for row in rows)
        return [by_id[run_id] for run_id in run_ids if run_id in by_id]

    def activate_run(self, run_id: str, *, reason: str) -> RunRecord:
        """Make a queued run its conversation's current run (conversation → ``queued``)."""
        with self._write() as conn:
            run = self._runs.run(conn, run_id)
            self._runs.activate(conn, self._conversation(conn, run.conversation_id), run_id, reason)
            return run

    def transition_run(
        self, run_id: str, trigger: Trigger, *, reason: str, error: str | None = None
    ) -> RunRecord:
        """Apply ``trigger`` to the run, and to its conversation if it is the current run.

        Errors:
            :class:`~app.errors.IllegalTransition` — nothing is changed.
        """
        with self._write() as conn:
            return self._runs.transition(conn, run_id, trigger, reason, error)

    def stop_runs(self, run_ids: list[str], *, reason: str) -> list[RunRecord]:
        """Apply ``Trigger.STOP`` to every listed run that is still active, and to its
        conversation where it is the current run (with the status event, as
        :meth:`transition_run` does) — all in one transaction.

        Runs already ended, or gone, are skipped (not an error). Returns the records it
        changed, in the order given.
        """
        with self._write() as conn:
            stopped = self._runs.stop(conn, run_ids, reason)
        order = {run_id: index for index, run_id in enumerate(run_ids)}
        return sorted(stopped, key=lambda run: order[run.id])

    def claim_runs(self, limit: int) -> list[tuple[RunRecord, ConversationRecord]]:
        """Shared database: claim at most ``limit`` queued runs for this node, recorded
        ``running`` (``app/store/claims.py``); one transaction."""
        with self._write() as conn:
            return self._queue_rows().claim(conn, limit)

    def queue_positions(self, run_ids: list[str]) -> dict[str, int]:
        """Shared database: the cluster-wide ``queue_position`` of those of the runs that
        are claimable (``app/store/claims.py``)."""
        with self._read() as conn:
            return self._queue_rows().positions(conn, run_ids)

    def queue_channel(self) -> str:
        """Shared database: the channel a NOTIFY says "a run can be claimed" on."""
        with self._read() as conn:
            return self._queue_rows().channel(conn)

    def _queue_rows(self) -> QueueRows:
        if not isinstance(self._runs, QueueRows):
            raise TypeError("runs are queued in the database only on a shared (PostgreSQL) store")
        return self._runs

    def save_progress(self, run_id: str, *, steps: int, agent_state: dict[str, Any]) -> None:
        """Record a completed step: the run's step count and the agent's state, together
        (group-committed; the state's JSON is made in the caller's thread)."""
        self._submit(partial(self._runs.save_progress, run_id, steps, json.dumps(agent_state)))

    def get_run(self, conversation_id: str, run_id: str) -> RunRecord:
        with self._read() as conn:
            run = self._runs.run(conn, run_id)
        if run.conversation_id != conversation_id:
            raise NotFound(f"no run {run_id} in conversation {conversation_id}")
        return run

    def list_runs(
        self, conversation_id: str, *, limit: int, after: int | None
    ) -> tuple[list[RunRecord], int | None]:
        """Oldest first; the second value is the ``after`` cursor of the next page."""
        with self._read() as conn:
            self._conversation(conn, conversation_id)
            rows = conn.execute(
                "SELECT * FROM runs WHERE conversation_id = ? AND n > ? ORDER BY n LIMIT ?",
                (conversation_id, after or 0, limit + 1),
            ).fetchall()
        items = [queries.run_from_row(row) for row in rows[:limit]]
        return items, (rows[limit - 1]["n"] if len(rows) > limit else None)

    def recover_interrupted(self, *, reason: str) -> list[str]:
        """After a crash: stop every run left active; return the conversations it touched.

        Their conversations become ``paused`` with ``reason`` and a status event; the caller
        may re-queue them (``resume_on_start``). One :meth:`stop_runs` transaction per
        ``_RUNS_PER_RECOVERY`` runs.
        """
        active = tuple(status.value for status in ACTIVE)
        with self._read() as conn:
            rows = conn.execute(
                "SELECT id FROM runs WHERE status IN (?, ?, ?) ORDER BY n", active
            ).fetchall()
        run_ids = [row["id"] for row in rows]
        touched: dict[str, None] = {}
        for start in range(0, len(run_ids), _RUNS_PER_RECOVERY):
            stopped = self.stop_runs(run_ids[start : start + _RUNS_PER_RECOVERY], reason=reason)
            touched.update((run.conversation_id, None) for run in stopped)
        return list(touched)

    def list_active_runs(self) -> list[RunRecord]:
        """Runs that are queued, running or pausing (any order)."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT * FROM runs WHERE status IN ('queued', 'running', 'pausing')"
            ).fetchall()
        return [queries.run_from_row(row) for row in rows]

    # -- events ------------------------------------------------------------------------

    def append_event(
        self, conversation_id: str, run_id: str | None, source: Source, payload: Payload
    ) -> Event:
        """Commit one event and return it (with its ``seq``). Group-committed: the event may
        share its transaction with other threads' writes; it is committed when this returns.
        """
        new = NewEvent.of(conversation_id, run_id, source, payload)  # in the caller's thread
        return self._submit(partial(self._insert_event, new))

    def _append(
        self,
        conn: Connection,
        conversation_id: str,
        run_id: str | None,
        source: Source,
        payload: Payload,
        current_run_id: str | None = None,
    ) -> Event:
        """Insert one event with the next ``seq``; a status payload also sets the status."""
        new = NewEvent.of(conversation_id, run_id, source, payload, current_run_id)
        return self._insert_event(new, conn)

    def _insert_event(self, new: NewEvent, conn: Connection) -> Event:
        event = insert_event(conn, new, self._dialect.text)
        if event is None:
            raise conversation_not_found(new.conversation_id)
        self._touched.add(new.conversation_id)
        self._appended.append(event)
        return event

    def append_message(
        self,
        conversation_id: str,
        payload: Payload,
        *,
        run: NewRun | None = None,
        idempotent: IdempotentWrite[MessageWritten] | None = None,
    ) -> MessageWritten:
        """Commit a user message and, with ``run``, the run it asks for: one transaction.

        Errors: as :meth:`create_run`.
        """
        with self._write() as conn:
            if idempotent is not None:
                check_key(conn, idempotent.key, idempotent.request_hash)
            event = self._append(conn, conversation_id, None, Source.USER, payload)
            conversation = self._conversation(conn, conversation_id)
            record = None if run is None else self._runs.insert(conn, conversation, run)
            written = MessageWritten(event, record, self._conversation(conn, conversation_id))
            if idempotent is not None:
                self._save_answer(conn, idempotent, conversation_id, written)
            return written

    def search_events(self, conversation_id: str, query: EventQuery) -> EventPage:
        with self._read() as conn:
            self._conversation(conn, conversation_id)
            rows = queries.search_events(conn, conversation_id, query, self._dialect.text)
        items = [queries.event_from_row(row) for row in rows[: query.limit]]
        next_seq = items[-1].seq if len(rows) > query.limit else None
        return EventPage(items, next_seq)

    def count_events(self, conversation_id: str, query: EventQuery) -> int:
        with self._read() as conn:
            self._conversation(conn, conversation_id)
            return queries.count_events(conn, conversation_id, query, self._dialect.text)

    def get_event(self, conversation_id: str, event_id: str) -> Event:
        with self._read() as conn:
            row = conn.execute(
                "SELECT * FROM events WHERE id = ? AND conversation_id = ?",
                (event_id, conversation_id),
            ).fetchone()
        if row is None:
            raise NotFound(
                f"no event {event_id} in conversation {conversation_id}",
                detail={"event_id": event_id},
            )
        return queries.event_from_row(row)


def conversation_not_found(conversation_id: str) -> NotFound:
    return NotFound(
        f"no conversation with id {conversation_id}", detail={"conversation_id": conversation_id}
    )
