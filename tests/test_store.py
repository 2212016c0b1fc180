"""The store (``app/store/sql_store.py``, ``app/store/queries.py``) on each engine: a real
SQLite file and a real PostgreSQL schema (``tests/store_kinds.py``); SQLite-only tests say why."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from app.errors import IdempotencyKeyReused, IllegalTransition, InvalidInput, NotFound
from app.events import ErrorPayload, Event, MessagePayload, Source, StatusPayload, utc_now
from app.lifecycle import TRANSITIONS, Status, Trigger
from app.records import ConversationRecord, Webhook
from app.settings import Settings
from app.store import EventQuery, NewConversation, Order, SqliteStore
from app.store.idempotency import key_cutoff, scoped_key
from app.store.schema import SCHEMA_VERSION
from app.store.sql_store import SqlStore
from tests.store_kinds import any_store_fixture, raw, store_opener_fixture

NOW = utc_now().isoformat()


# Every test here runs on both engines, unless it opens a SqliteStore of its own.
store = any_store_fixture()
store_opener = store_opener_fixture()


def new(initial_message: str | None = None, **fields: Any) -> NewConversation:
    agent = {"kind": "script", "steps": []}
    return NewConversation(agent, "a title", 7, initial_message=initial_message, **fields)


def create(store: SqlStore, initial_message: str | None = None) -> ConversationRecord:
    conversation, created = store.create_conversation(new(initial_message))
    assert created
    return conversation


def say(store: SqlStore, conversation_id: str, text: str, run_id: str | None = None) -> Event:
    return store.append_event(conversation_id, run_id, Source.AGENT, MessagePayload(text=text))


def seqs(store: SqlStore, conversation_id: str, **query: Any) -> list[int]:
    page = store.search_events(conversation_id, EventQuery(limit=1000, **query))
    return [event.seq for event in page.items]


def statuses(store: SqlStore, conversation_id: str) -> list[tuple[str, str, str, str | None]]:
    """(status, previous, reason, run_id) of every status event, oldest first."""
    result = []
    for event in store.search_events(conversation_id, EventQuery(kind="status")).items:
        assert isinstance(event.payload, StatusPayload)
        assert event.source is Source.SYSTEM
        status, previous = event.payload.status.value, event.payload.previous.value
        result.append((status, previous, event.payload.reason, event.run_id))
    return result


def raw_counts(store: SqlStore, conversation_id: str) -> list[int]:
    """Rows of the conversation in conversations, runs, events, idempotency_keys."""
    sql = [
        "SELECT count(*) FROM conversations WHERE id = ?",
        *(
            f"SELECT count(*) FROM {table} WHERE conversation_id = ?"
            for table in ("runs", "events", "idempotency_keys")
        ),
    ]
    return [raw(store, query, (conversation_id,))[0][0] for query in sql]


# -- conversations ---------------------------------------------------------------------


def test_create_conversation_starts_idle_with_first_user_message(store: SqlStore) -> None:
    """A new conversation is idle, has no run, and its initial message is event seq 1."""
    conversation = create(store, "Hello")
    assert (conversation.status, conversation.run) == (Status.IDLE, None)
    assert conversation.event_count == 1
    assert (conversation.title, conversation.max_iterations) == ("a title", 7)
    assert conversation.agent == {"kind": "script", "steps": []}
    [event] = store.search_events(conversation.id, EventQuery()).items
    assert (event.seq, event.source, event.run_id) == (1, Source.USER, None)
    assert event.payload == MessagePayload(text="Hello")
    assert store.get_conversation(conversation.id) == conversation
    assert create(store).event_count == 0


def test_create_conversation_replays_idempotency_key(store: SqlStore) -> None:
    """The same key and request hash return the first conversation with created=False."""
    first, created = store.create_conversation(new("hi", idempotency_key="k", request_hash="h"))
    again, created_again = store.create_conversation(
        new("hi", idempotency_key="k", request_hash="h")
    )
    assert (created, created_again) == (True, False)
    assert again == first
    assert again.event_count == 1
    page = store.list_conversations(status=None, limit=10, cursor=None)
    assert [c.id for c in page.items] == [first.id]


def test_create_conversation_refuses_reused_key_with_other_body(store: SqlStore) -> None:
    """The same key with a different request hash raises 422 and creates nothing."""
    first, _ = store.create_conversation(new("hi", idempotency_key="k", request_hash="h1"))
    with pytest.raises(IdempotencyKeyReused) as info:
        store.create_conversation(new("other", idempotency_key="k", request_hash="h2"))
    assert (info.value.status, info.value.detail) == (422, {"idempotency_key": "k"})
    page = store.list_conversations(status=None, limit=10, cursor=None)
    assert [c.id for c in page.items] == [first.id]
    assert store.get_conversation(first.id).event_count == 1


def test_idempotency_keys_are_scoped_per_tenant(store: SqlStore) -> None:
    """The same client key of two tenants is two keys; an error echoes the client's key
    only, never the tenant it was scoped to."""
    a_key, b_key = scoped_key("a", "k"), scoped_key("b", "k")
    first, _ = store.create_conversation(new("hi", idempotency_key=a_key, request_hash="h"))
    other, created = store.create_conversation(new("hi", idempotency_key=b_key, request_hash="h"))
    assert created and other.id != first.id
    with pytest.raises(IdempotencyKeyReused) as info:
        store.create_conversation(new("x", idempotency_key=a_key, request_hash="h2"))
    assert info.value.detail == {"idempotency_key": "k"}


def test_expired_idempotency_keys_are_purged_and_then_new(store: SqlStore) -> None:
    """A key older than the retention is deleted (alone, or with every expired key), its
    conversation stays, and the same key then creates anew."""
    old, _ = store.create_conversation(new("hi", idempotency_key="old", request_hash="h"))
    store.create_conversation(new("hi", idempotency_key="kept", request_hash="h"))
    raw(store, "UPDATE idempotency_keys SET created_at = '2000-01-01T00:00:00+00:00'")
    raw(store, "UPDATE idempotency_keys SET created_at = ? WHERE key = 'kept'", (NOW,))
    cutoff = key_cutoff(24)
    assert store.purge_idempotency_keys(cutoff, "kept") == 0
    assert store.purge_idempotency_keys(cutoff, "old") == 1
    assert store.purge_idempotency_keys(cutoff) == 0
    store.check_idempotency_key("old", "other hash")  # a new key: no 422
    again, created = store.create_conversation(new("x", idempotency_key="old", request_hash="h2"))
    assert created and again.id != old.id
    assert store.get_conversation(old.id).event_count == 1
    with pytest.raises(IdempotencyKeyReused):
        store.check_idempotency_key("kept", "other hash")


def test_list_conversations_pages_newest_first(store: SqlStore) -> None:
    """Pages come newest first and next_cursor walks them until it is None."""
    ids = [create(store).id for _ in range(5)]
    pages, cursor = [], None
    while True:
        page = store.list_conversations(status=None, limit=2, cursor=cursor)
        pages.append([c.id for c in page.items])
        cursor = page.next_cursor
        if cursor is None:
            break
    assert pages == [[ids[4], ids[3]], [ids[2], ids[1]], [ids[0]]]


def test_list_conversations_filters_by_status(store: SqlStore) -> None:
    """The status filter returns only conversations in that status, newest first."""
    ids = [create(store).id for _ in range(5)]
    for index in (1, 3):
        store.create_run(ids[index], run_id=f"run-{index}", activate=True, reason="api")
    queued = store.list_conversations(status=Status.QUEUED, limit=10, cursor=None)
    idle = store.list_conversations(status=Status.IDLE, limit=2, cursor=None)
    idle_rest = store.list_conversations(status=Status.IDLE, limit=2, cursor=idle.next_cursor)
    assert [c.id for c in queued.items] == [ids[3], ids[1]]
    assert [c.id for c in idle.items + idle_rest.items] == [ids[4], ids[2], ids[0]]
    assert idle_rest.next_cursor is None


@pytest.mark.parametrize(
    "cursor",
    [
        pytest.param("abc", id="letters"),
        pytest.param("", id="empty"),
        pytest.param("-1", id="negative"),
        pytest.param("1.5", id="decimal"),
        pytest.param("²", id="superscript"),
        pytest.param("9" * 30, id="huge"),
    ],
)
def test_list_conversations_malformed_cursor_raises_invalid_input(
    store: SqlStore, cursor: str
) -> None:
    """A cursor that is not a returned next_cursor raises InvalidInput (422)."""
    create(store)
    with pytest.raises(InvalidInput) as info:
        store.list_conversations(status=None, limit=10, cursor=cursor)
    assert info.value.status == 422


def test_delete_conversation_removes_runs_and_events(store: SqlStore) -> None:
    """Deleting removes the conversation's rows in every table and leaves others alone."""
    gone, _ = store.create_conversation(new("hi", idempotency_key="k", request_hash="h"))
    kept = create(store, "stay")
    store.create_run(gone.id, run_id="r1", activate=True, reason="api")
    store.transition_run("r1", Trigger.START, reason="slot")
    assert raw_counts(store, gone.id) == [1, 1, 3, 1]
    store.delete_conversation(gone.id)
    assert raw_counts(store, gone.id) == [0, 0, 0, 0]
    assert raw_counts(store, kept.id) == [1, 0, 1, 0]
    with pytest.raises(NotFound):
        store.get_conversation(gone.id)
    with pytest.raises(NotFound):
        store.delete_conversation(gone.id)


# -- events ----------------------------------------------------------------------------


def test_append_event_numbers_seq_per_conversation(store: SqlStore) -> None:
    """Seq counts 1, 2, 3 … per conversation, independently across interleaved appends."""
    a, b = create(store, "a1"), create(store)
    got = [(c.id, say(store, c.id, f"m{i}").seq) for i in range(3) for c in (a, b)]
    assert got == [(a.id, 2), (b.id, 1), (a.id, 3), (b.id, 2), (a.id, 4), (b.id, 3)]
    assert (seqs(store, a.id), seqs(store, b.id)) == ([1, 2, 3, 4], [1, 2, 3])
    assert store.get_conversation(a.id).event_count == 4


def test_append_event_concurrent_threads_get_gapless_seqs(store: SqlStore) -> None:
    """Four threads appending to one conversation at once get exactly seqs 1..N, no gaps."""
    conversation = create(store)
    per_thread, threads_n = 50, 4
    start = threading.Barrier(threads_n)
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def append_many(number: int) -> None:
        try:
            start.wait()
            results[number] = [
                say(store, conversation.id, f"{number}:{i}").seq for i in range(per_thread)
            ]
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=append_many, args=(n,)) for n in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    everything = list(range(1, per_thread * threads_n + 1))
    assert sorted(seq for got in results.values() for seq in got) == everything
    assert all(got == sorted(got) for got in results.values())
    assert seqs(store, conversation.id) == everything
    assert store.get_conversation(conversation.id).event_count == len(everything)


@pytest.fixture
def log(store: SqlStore) -> tuple[str, list[Event]]:
    """A conversation with seven varied events, plus another that must never show up."""
    other = create(store, "the weather elsewhere")
    store.create_run(other.id, run_id="run-b", activate=True, reason="api")
    c = create(store, "Hello world")  # 1 user message
    store.create_run(c.id, run_id="run-a", activate=True, reason="api")  # 2 status queued
    store.transition_run("run-a", Trigger.START, reason="slot")  # 3 status running
    error = ErrorPayload(message="boom", error_type="RuntimeError")
    appended = [
        say(store, c.id, "Check the WEATHER", "run-a"),  # 4
        store.append_event(c.id, "run-a", Source.TOOL, MessagePayload(text="sunny")),  # 5
        store.append_event(c.id, "run-a", Source.SYSTEM, error),  # 6
    ]
    store.transition_run("run-a", Trigger.FAIL, reason="agent_error", error="boom")  # 7
    return c.id, appended


FILTERS = [
    pytest.param({}, [1, 2, 3, 4, 5, 6, 7], id="none"),
    pytest.param({"kind": "message"}, [1, 4, 5], id="kind-message"),
    pytest.param({"kind": "status"}, [2, 3, 7], id="kind-status"),
    pytest.param({"kind": "error"}, [6], id="kind-error"),
    pytest.param({"source": Source.USER}, [1], id="source-user"),
    pytest.param({"source": Source.SYSTEM}, [2, 3, 6, 7], id="source-system"),
    pytest.param({"run_id": "run-a"}, [2, 3, 4, 5, 6, 7], id="run-id"),
    pytest.param({"run_id": "run-b"}, [], id="run-id-of-other-conversation"),
    pytest.param({"q": "weather"}, [4], id="q-case-insensitive"),
    pytest.param({"q": "SUNNY"}, [5], id="q-upper"),
    pytest.param({"q": "boom"}, [6], id="q-error-message"),
    pytest.param({"after_seq": 4}, [5, 6, 7], id="after-seq"),
    pytest.param({"before_seq": 3}, [1, 2], id="before-seq"),
    pytest.param({"after_seq": 2, "before_seq": 6}, [3, 4, 5], id="seq-window"),
    pytest.param({"kind": "message", "source": Source.TOOL}, [5], id="kind-and-source"),
    pytest.param({"kind": "status", "after_seq": 2}, [3, 7], id="kind-and-after"),
]


@pytest.mark.parametrize(("filters", "expected"), FILTERS)
def test_search_events_filters(
    store: SqlStore, log: tuple[str, list[Event]], filters: dict[str, Any], expected: list[int]
) -> None:
    """Each filter returns exactly the matching events of this conversation, in both orders."""
    conversation_id, _ = log
    assert seqs(store, conversation_id, **filters) == expected
    assert seqs(store, conversation_id, order=Order.DESC, **filters) == expected[::-1]


@pytest.mark.parametrize(("filters", "expected"), FILTERS)
def test_count_events_filters(
    store: SqlStore, log: tuple[str, list[Event]], filters: dict[str, Any], expected: list[int]
) -> None:
    """count_events counts what search_events finds, ignoring limit and order."""
    conversation_id, _ = log
    count = store.count_events(conversation_id, EventQuery(limit=1, order=Order.DESC, **filters))
    assert count == len(expected)


def test_search_events_q_matches_text_with_quotes(store: SqlStore) -> None:
    """A q containing a double quote finds a message whose text contains it."""
    conversation = create(store, 'she said "hi"')
    assert seqs(store, conversation.id, q='"hi"') == [1]


@pytest.mark.parametrize("q", ["kind", "text", "message", "{"], ids=str)
def test_search_events_q_ignores_json_syntax(store: SqlStore, q: str) -> None:
    """q matches what was said, never the payload's JSON keys, kind or punctuation."""
    conversation = create(store, "plain words")
    assert seqs(store, conversation.id, q=q) == []


@pytest.mark.parametrize(
    ("order", "cursor_field", "pages"),
    [
        pytest.param(Order.ASC, "after_seq", [[1, 2, 3], [4, 5, 6], [7]], id="asc"),
        pytest.param(Order.DESC, "before_seq", [[7, 6, 5], [4, 3, 2], [1]], id="desc"),
        pytest.param(Order.ASC, "after_seq", [[1, 2, 3, 4, 5, 6, 7]], id="exactly-full"),
    ],
)
def test_search_events_pages_with_next_seq(
    store: SqlStore,
    log: tuple[str, list[Event]],
    order: Order,
    cursor_field: str,
    pages: list[list[int]],
) -> None:
    """Passing next_seq back walks every event page by page until next_seq is None."""
    conversation_id, _ = log
    got, cursor = [], None
    while True:
        query = EventQuery(order=order, limit=len(pages[0]), **{cursor_field: cursor})
        page = store.search_events(conversation_id, query)
        got.append([event.seq for event in page.items])
        if page.next_seq is None:
            break
        assert page.next_seq == page.items[-1].seq
        cursor = page.next_seq
    assert got == pages


def test_get_event_returns_committed_event(store: SqlStore, log: tuple[str, list[Event]]) -> None:
    """get_event returns each event exactly as append_event returned it."""
    conversation_id, appended = log
    assert [store.get_event(conversation_id, event.id) for event in appended] == appended


UNKNOWN: list[Any] = [
    pytest.param(lambda s, c, e: s.get_conversation("nope"), id="get_conversation"),
    pytest.param(lambda s, c, e: s.get_event(c, "nope"), id="get_event-unknown"),
    pytest.param(lambda s, c, e: s.get_event(c, e), id="get_event-of-other-conversation"),
    pytest.param(lambda s, c, e: s.search_events("nope", EventQuery()), id="search_events"),
    pytest.param(lambda s, c, e: s.count_events("nope", EventQuery()), id="count_events"),
    pytest.param(lambda s, c, e: s.get_run(c, "run-a"), id="get_run-of-other-conversation"),
    pytest.param(lambda s, c, e: s.get_agent_state("nope"), id="get_agent_state"),
    pytest.param(lambda s, c, e: s.list_runs("nope", limit=1, after=None), id="list_runs"),
    pytest.param(lambda s, c, e: s.delete_conversation("nope"), id="delete_conversation"),
    pytest.param(
        lambda s, c, e: s.create_run("nope", run_id="x", activate=True, reason="api"),
        id="create_run",
    ),
]


@pytest.mark.parametrize("call", UNKNOWN)
def test_store_unknown_id_raises_not_found(
    store: SqlStore,
    log: tuple[str, list[Event]],
    call: Callable[[SqlStore, str, str], object],
) -> None:
    """An unknown id, or an id of another conversation, raises NotFound (404)."""
    _, appended = log
    with pytest.raises(NotFound) as info:
        call(store, create(store).id, appended[0].id)
    assert info.value.status == 404


# -- runs ------------------------------------------------------------------------------


def test_create_run_activate_queues_conversation(store: SqlStore) -> None:
    """An activated run is queued, becomes the current run, and writes one status event."""
    conversation = create(store)
    run, returned = store.create_run(conversation.id, run_id="r1", activate=True, reason="api")
    assert (run.id, run.conversation_id, run.status) == ("r1", conversation.id, Status.QUEUED)
    assert run.reason == "api"  # why the run exists, until a transition gives a new reason
    assert (run.started_at, run.finished_at, run.steps, run.error) == (None, None, 0, None)
    after = store.get_conversation(conversation.id)
    assert (after.status, after.run) == (Status.QUEUED, run)
    assert returned == after
    assert statuses(store, conversation.id) == [("queued", "idle", "api", "r1")]


def test_create_run_without_activate_leaves_conversation(store: SqlStore) -> None:
    """A run created with activate=False is recorded but the conversation does not change."""
    conversation = create(store)
    run, returned = store.create_run(conversation.id, run_id="r1", activate=False, reason="api")
    assert store.get_conversation(conversation.id) == returned == conversation
    assert store.get_run(conversation.id, "r1") == run
    assert store.list_active_runs() == [run]


def test_create_run_refused_records_no_run(store: SqlStore) -> None:
    """Activating a second run on a queued conversation raises and records nothing."""
    conversation = create(store)
    store.create_run(conversation.id, run_id="r1", activate=True, reason="api")
    before = store.get_conversation(conversation.id)
    with pytest.raises(IllegalTransition):
        store.create_run(conversation.id, run_id="r2", activate=True, reason="api")
    assert store.get_conversation(conversation.id) == before
    assert [r.id for r in store.list_runs(conversation.id, limit=10, after=None)[0]] == ["r1"]


@pytest.mark.parametrize(
    ("trigger", "end", "error"),
    [
        pytest.param(Trigger.FINISH, Status.FINISHED, None, id="finish"),
        pytest.param(Trigger.FAIL, Status.ERROR, "boom", id="fail"),
    ],
)
def test_transition_run_records_times_and_status_events(
    store: SqlStore, trigger: Trigger, end: Status, error: str | None
) -> None:
    """START sets started_at, the end sets finished_at; the conversation follows with events."""
    conversation = create(store, "hi")
    store.create_run(conversation.id, run_id="r1", activate=True, reason="api")
    started = store.transition_run("r1", Trigger.START, reason="slot")
    assert (started.status, started.reason, started.finished_at) == (Status.RUNNING, "slot", None)
    assert started.started_at is not None
    assert store.get_conversation(conversation.id).status is Status.RUNNING
    done = store.transition_run("r1", trigger, reason="done", error=error)
    assert (done.status, done.reason, done.error) == (end, "done", error)
    assert done.started_at == started.started_at
    assert done.finished_at is not None
    assert done.finished_at >= started.started_at
    after = store.get_conversation(conversation.id)
    assert (after.status, after.run, after.event_count) == (end, done, 4)
    assert statuses(store, conversation.id) == [
        ("queued", "idle", "api", "r1"),
        ("running", "queued", "slot", "r1"),
        (end.value, "running", "done", "r1"),
    ]


ILLEGAL_RUN_TRIGGERS = [
    *(
        pytest.param([], trigger, id=f"queued-{trigger}")
        for trigger in Trigger
        if trigger not in TRANSITIONS[Status.QUEUED]
    ),
    *(
        pytest.param([Trigger.START, Trigger.FINISH], trigger, id=f"finished-{trigger}")
        for trigger in Trigger
    ),
]


@pytest.mark.parametrize(("setup", "trigger"), ILLEGAL_RUN_TRIGGERS)
def test_transition_run_illegal_changes_nothing(
    store: SqlStore, setup: list[Trigger], trigger: Trigger
) -> None:
    """An illegal trigger raises IllegalTransition and leaves run, conversation and log as-is."""
    conversation = create(store, "hi")
    store.create_run(conversation.id, run_id="r1", activate=True, reason="api")
    for step in setup:
        store.transition_run("r1", step, reason="setup")
    run_before = store.get_run(conversation.id, "r1")
    conversation_before = store.get_conversation(conversation.id)
    with pytest.raises(IllegalTransition):
        store.transition_run("r1", trigger, reason="illegal", error="x")
    assert store.get_run(conversation.id, "r1") == run_before
    assert store.get_conversation(conversation.id) == conversation_before
    assert store.count_events(conversation.id, EventQuery()) == conversation_before.event_count


def test_transition_run_not_current_changes_run_only(store: SqlStore) -> None:
    """Stopping a run that is not the conversation's current run leaves the conversation."""
    conversation = create(store)
    store.create_run(conversation.id, run_id="r1", activate=True, reason="api")
    store.create_run(conversation.id, run_id="r2", activate=False, reason="api")
    before = store.get_conversation(conversation.id)
    run = store.transition_run("r2", Trigger.STOP, reason="interrupt")
    assert (run.status, run.reason) == (Status.PAUSED, "interrupt")
    assert run.finished_at is not None
    assert store.get_conversation(conversation.id) == before
    assert before.run is not None
    assert before.run.id == "r1"


def test_activate_run_makes_waiting_run_current(store: SqlStore) -> None:
    """A run that waited behind a finished run becomes current and re-queues the conversation."""
    conversation = create(store)
    store.create_run(conversation.id, run_id="r1", activate=True, reason="api")
    store.create_run(conversation.id, run_id="r2", activate=False, reason="api")
    store.transition_run("r1", Trigger.START, reason="slot")
    store.transition_run("r1", Trigger.FINISH, reason="done")
    store.activate_run("r2", reason="next")
    after = store.get_conversation(conversation.id)
    assert (after.status, after.run and after.run.id) == (Status.QUEUED, "r2")
    assert statuses(store, conversation.id)[-1] == ("queued", "finished", "next", "r2")


def test_save_progress_round_trips_agent_state(store: SqlStore) -> None:
    """save_progress stores the step count on the run and the agent state on the conversation."""
    conversation = create(store)
    assert store.get_agent_state(conversation.id) == {}
    store.create_run(conversation.id, run_id="r1", activate=True, reason="api")
    state = {"memory": ["a", "b"], "n": 2, "nested": {"ok": True}}
    store.save_progress("r1", steps=2, agent_state=state)
    assert store.get_agent_state(conversation.id) == state
    assert store.get_run(conversation.id, "r1").steps == 2


def test_list_runs_pages_oldest_first(store: SqlStore) -> None:
    """list_runs returns only this conversation's runs, oldest first, until the cursor is None."""
    conversation, other = create(store), create(store)
    for i in range(5):
        store.create_run(conversation.id, run_id=f"r{i}", activate=False, reason="api")
        store.create_run(other.id, run_id=f"other-{i}", activate=False, reason="api")
    pages, after = [], None
    while True:
        items, after = store.list_runs(conversation.id, limit=2, after=after)
        pages.append([run.id for run in items])
        if after is None:
            break
    assert pages == [["r0", "r1"], ["r2", "r3"], ["r4"]]


# -- recovery and the file -------------------------------------------------------------


def test_recover_interrupted_pauses_active_runs(store_opener: Callable[[], SqlStore]) -> None:
    """After a reopen, runs left queued/running/pausing become paused with their conversations."""
    store = store_opener()
    queued, running, pausing, finished, idle = (create(store).id for _ in range(5))
    setups: dict[str, list[Trigger]] = {
        queued: [],
        running: [Trigger.START],
        pausing: [Trigger.START, Trigger.REQUEST_PAUSE],
        finished: [Trigger.START, Trigger.FINISH],
    }
    for conversation_id, triggers in setups.items():
        store.create_run(
            conversation_id, run_id=f"run-{conversation_id}", activate=True, reason="api"
        )
        for trigger in triggers:
            store.transition_run(f"run-{conversation_id}", trigger, reason="setup")
    store.close()  # the "crash": nothing was stopped

    store = store_opener()
    touched = store.recover_interrupted(reason="crash_recovery")
    assert touched == [queued, running, pausing]
    for conversation_id, previous in zip(touched, ["queued", "running", "pausing"], strict=True):
        after = store.get_conversation(conversation_id)
        assert after.status is Status.PAUSED
        assert after.run is not None
        assert (after.run.status, after.run.reason) == (Status.PAUSED, "crash_recovery")
        last = statuses(store, conversation_id)[-1]
        assert last == ("paused", previous, "crash_recovery", f"run-{conversation_id}")
    assert store.get_conversation(finished).status is Status.FINISHED
    assert store.get_conversation(idle).status is Status.IDLE
    assert store.list_active_runs() == []
    assert store.recover_interrupted(reason="crash_recovery") == []


def test_store_data_survives_reopen(store_opener: Callable[[], SqlStore]) -> None:
    """Conversations, runs and events written before close() are there after reopening."""
    store = store_opener()
    conversation = create(store, "persist me")
    store.create_run(conversation.id, run_id="r1", activate=True, reason="api")
    before = store.get_conversation(conversation.id)
    events = store.search_events(conversation.id, EventQuery()).items
    store.close()

    reopened = store_opener()
    assert reopened.get_conversation(conversation.id) == before
    assert reopened.search_events(conversation.id, EventQuery()).items == events
    assert say(reopened, conversation.id, "more").seq == 3


def test_store_file_is_in_wal_mode(settings: Settings) -> None:
    """The database file is switched to WAL journal mode, as a raw connection sees it.
    (SQLite only: a file's journal.)"""
    SqliteStore(settings.database_path).close()
    with closing(sqlite3.connect(settings.database_path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("version", [pytest.param(v, id=f"v{v}") for v in (1, 2, 3)])
def test_store_migrates_an_older_file(tmp_path: Path, version: int) -> None:
    """(SQLite's migrations.) A file of an older schema version (its columns dropped again,
    its version set back) is brought to the current version on open: old rows read as
    before (no webhook, tenant ``default``), new conversations keep their webhook, tenant
    and keyed answers, a tenant's list shows only its own, and user_version says so."""
    path = tmp_path / "old.sqlite3"
    store = SqliteStore(path)
    old = create(store, "from before")
    store.close()
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("ALTER TABLE runs DROP COLUMN node")  # as version 5 had it
        conn.execute("DROP TRIGGER events_text_forget")  # as version 4 had it
        conn.execute("DROP TABLE events_text")
        conn.execute("ALTER TABLE conversations DROP COLUMN indexed_seq")
        conn.execute("DROP INDEX conversations_by_tenant")  # as version 3 had it
        conn.execute("ALTER TABLE conversations DROP COLUMN tenant")
        if version <= 2:
            conn.execute("ALTER TABLE conversations DROP COLUMN webhook")
        if version == 1:
            conn.execute("ALTER TABLE idempotency_keys DROP COLUMN answer")
        conn.execute(f"PRAGMA user_version = {version}")
        conn.commit()

    hook = Webhook(url="http://127.0.0.1:9/hook")
    migrated = SqliteStore(path)
    try:
        assert migrated.get_conversation(old.id).webhook is None
        assert migrated.get_conversation(old.id).tenant == "default"
        assert seqs(migrated, old.id) == [1]
        hooked, _ = migrated.create_conversation(
            new(webhook=hook, idempotency_key="k", tenant="alice")
        )
    finally:
        migrated.close()
    reopened = SqliteStore(path)
    try:
        assert reopened.get_conversation(hooked.id).webhook == hook
        assert reopened.get_conversation(hooked.id).tenant == "alice"
        mine = reopened.list_conversations(status=None, limit=10, cursor=None, tenant="alice")
        assert [item.id for item in mine.items] == [hooked.id]
        theirs = reopened.list_conversations(status=None, limit=10, cursor=None, tenant="default")
        assert [item.id for item in theirs.items] == [old.id]
        every = reopened.list_conversations(status=None, limit=10, cursor=None)
        assert [item.id for item in every.items] == [hooked.id, old.id]
    finally:
        reopened.close()
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT n FROM conversations WHERE tenant = ? ORDER BY n DESC",
            ("alice",),
        ).fetchall()
        assert "conversations_by_tenant" in str([tuple(row) for row in plan])
        columns = {row[1] for row in conn.execute("PRAGMA table_info(idempotency_keys)")}
        assert "answer" in columns
