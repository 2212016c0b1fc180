"""The run side of a write transaction: insert, activate, transition, stop, progress.

:class:`~app.store.sql_store.SqlStore` opens every transaction; inside it, these methods
change the ``runs`` rows and the conversation's status — always through the state machine
(``app/lifecycle.py``) and always with the ``status`` event that records the change, which
they append through the store (so the store sees every event its transaction appended and
every conversation it touched, for its listeners and its record cache).

Nothing here commits, and nothing here is thread-bound: the caller holds the write lock.
"""

from __future__ import annotations

from collections.abc import Callable

from app.errors import IllegalTransition, NotFound
from app.events import Event, Payload, Source, StatusPayload, utc_now
from app.lifecycle import ACTIVE, TERMINAL, Status, Trigger, run_transition, transition
from app.records import ConversationRecord, RunRecord
from app.store import queries
from app.store.base import NewRun
from app.store.engine import Connection

#: Ids per ``IN (...)`` query: SQLite allows 32,766 parameters (PostgreSQL 65,535);
#: smaller chunks keep each statement cheap to prepare.
IDS_PER_QUERY = 500

#: ``append(conn, conversation_id, run_id, source, payload, current_run_id)``: the store's
#: event insert (the next ``seq``; a status payload also sets the conversation's status).
Append = Callable[[Connection, str, str | None, Source, Payload, str | None], Event]


class RunRows:
    """The run-side statements of one store, used inside its write transactions.

    ``touched`` is the store's set of conversations the current transaction changed (their
    cached records embed the current run); ``append`` is the store's event insert;
    ``node``: the id runs recorded ``started`` are recorded with (``runs.node``: the node
    that claimed them when several share the database; a queued run has none), ``None``
    on SQLite.
    """

    def __init__(self, touched: set[str], append: Append, node: str | None = None) -> None:
        self._touched = touched
        self._append = append
        self._node = node

    def run(self, conn: Connection, run_id: str) -> RunRecord:
        row = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise NotFound(f"no run with id {run_id}", detail={"run_id": run_id})
        return queries.run_from_row(row)

    def insert(self, conn: Connection, conversation: ConversationRecord, new: NewRun) -> RunRecord:
        """A new ``queued`` run; activated (and started) as ``new`` says."""
        conn.execute(
            "INSERT INTO runs (id, conversation_id, status, reason, queued_at, node)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                new.run_id,
                conversation.id,
                Status.QUEUED.value,
                new.reason,
                utc_now().isoformat(),
                self._node if new.started else None,  # a queued run has no node yet
            ),
        )
        if new.activate:
            self.activate(conn, conversation, new.run_id, new.reason)
            if new.started:  # both status events, queued then running, in this transaction
                return self.transition(conn, new.run_id, Trigger.START, "started", None)
        return self.run(conn, new.run_id)

    def activate(
        self, conn: Connection, conversation: ConversationRecord, run_id: str, reason: str
    ) -> Event:
        """Make the run the conversation's current run (conversation → ``queued``)."""
        status = transition(conversation.status, Trigger.ENQUEUE)
        return self._set_conversation_status(
            conn, conversation.id, conversation.status, run_id, status, reason, activate=True
        )

    def transition(
        self,
        conn: Connection,
        run_id: str,
        trigger: Trigger,
        reason: str,
        error: str | None,
    ) -> RunRecord:
        """Apply ``trigger`` to the run, and to its conversation if it is the current run.

        Errors: :class:`~app.errors.IllegalTransition` before anything is changed — also
        when another node's transaction changed the run since it was read (PostgreSQL: the
        UPDATE only matches the status it read, e.g. not a run a sweeper paused meanwhile).
        """
        run = self.run(conn, run_id)
        status = run_transition(run.status, trigger)
        now = utc_now().isoformat()
        row = conn.execute(
            "UPDATE runs SET status = ?, reason = ?, error = COALESCE(?, error),"
            " started_at = CASE WHEN ? THEN ? ELSE started_at END,"
            " finished_at = CASE WHEN ? THEN ? ELSE finished_at END"
            " WHERE id = ? AND status = ? RETURNING *",
            (
                status.value,
                reason,
                error,
                trigger is Trigger.START,
                now,
                status in TERMINAL,
                now,
                run_id,
                run.status.value,
            ),
        ).fetchone()
        if row is None:
            raise IllegalTransition(
                "the run's status changed meanwhile (another node recorded it)",
                detail={"run_id": run_id, "trigger": trigger.value},
            )
        self._touched.add(run.conversation_id)  # its record embeds the current run
        current = conn.execute(
            "SELECT status FROM conversations WHERE id = ? AND current_run_id = ?",
            (run.conversation_id, run_id),
        ).fetchone()
        if current is not None:
            previous = Status(current["status"])
            new_status = transition(previous, trigger)
            self._set_conversation_status(
                conn, run.conversation_id, previous, run_id, new_status, reason
            )
        return queries.run_from_row(row)

    def stop(self, conn: Connection, run_ids: list[str], reason: str) -> list[RunRecord]:
        """``Trigger.STOP`` for every listed run still active, and for its conversation
        where it is the current run; ended or missing runs are skipped."""
        stopped: list[RunRecord] = []
        now = utc_now().isoformat()
        for start in range(0, len(run_ids), IDS_PER_QUERY):
            stopped += self._stop_active(conn, run_ids[start : start + IDS_PER_QUERY], reason, now)
        self._pause_conversations(conn, stopped, reason)
        return stopped

    def _stop_active(
        self, conn: Connection, run_ids: list[str], reason: str, now: str
    ) -> list[RunRecord]:
        """Stop the active runs among at most ``IDS_PER_QUERY`` ids (runs table only)."""
        marks = ", ".join("?" * len(run_ids))
        active = [
            row["id"]
            for row in conn.execute(f"SELECT id, status FROM runs WHERE id IN ({marks})", run_ids)
            if Status(row["status"]) in ACTIVE
        ]
        if not active:
            return []
        paused = run_transition(Status.RUNNING, Trigger.STOP)  # the same from every ACTIVE
        # The status condition again: on PostgreSQL another node's transaction may stop the
        # same runs (two sweepers, a dead node's own drain); the second UPDATE waits for
        # the first's row locks, re-checks it, and so stops (and records) each run once.
        rows = conn.execute(
            "UPDATE runs SET status = ?, reason = ?, finished_at = ?"
            f" WHERE id IN ({', '.join('?' * len(active))})"
            " AND status IN ('queued', 'running', 'pausing') RETURNING *",
            (paused.value, reason, now, *active),
        ).fetchall()
        return [queries.run_from_row(row) for row in rows]

    def _pause_conversations(self, conn: Connection, stopped: list[RunRecord], reason: str) -> None:
        """``Trigger.STOP`` for the conversations whose current run was stopped, each with
        its status event — in conversation id order: neighbouring index pages make 10,000
        appends ~1.6x faster than in run order."""
        stopped_ids = {run.id for run in stopped}
        conversation_ids = sorted({run.conversation_id for run in stopped})
        self._touched.update(conversation_ids)  # their records embed the current run
        for start in range(0, len(conversation_ids), IDS_PER_QUERY):
            chunk = conversation_ids[start : start + IDS_PER_QUERY]
            rows = conn.execute(
                "SELECT id, status, current_run_id FROM conversations"
                f" WHERE id IN ({', '.join('?' * len(chunk))}) ORDER BY id",
                chunk,
            ).fetchall()
            for row in rows:
                if row["current_run_id"] not in stopped_ids:
                    continue
                previous = Status(row["status"])
                new_status = transition(previous, Trigger.STOP)
                self._set_conversation_status(
                    conn, row["id"], previous, row["current_run_id"], new_status, reason
                )

    def _set_conversation_status(
        self,
        conn: Connection,
        conversation_id: str,
        previous: Status,
        run_id: str,
        status: Status,
        reason: str,
        *,
        activate: bool = False,
    ) -> Event:
        """Change the conversation's status (and, with ``activate``, its current run) and
        append the ``status`` event — one UPDATE and one INSERT."""
        payload = StatusPayload(status=status, previous=previous, reason=reason)
        current_run_id = run_id if activate else None
        return self._append(conn, conversation_id, run_id, Source.SYSTEM, payload, current_run_id)

    def save_progress(self, run_id: str, steps: int, state: str, conn: Connection) -> None:
        """A completed step: the run's step count and the agent's state (JSON)."""
        row = conn.execute(
            "UPDATE runs SET steps = ? WHERE id = ? RETURNING conversation_id", (steps, run_id)
        ).fetchone()
        if row is None:
            raise NotFound(f"no run with id {run_id}", detail={"run_id": run_id})
        self._touched.add(row["conversation_id"])  # the current run's step count
        conn.execute(
            "UPDATE conversations SET agent_state = ? WHERE id = ?", (state, row["conversation_id"])
        )
