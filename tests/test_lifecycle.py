"""The status table of conversations and runs (``app/lifecycle.py``): the table is the spec."""

from __future__ import annotations

import copy
import itertools

import pytest

from app.errors import Conflict, IllegalTransition
from app.lifecycle import (
    ACTIVE,
    TERMINAL,
    TRANSITIONS,
    Status,
    Trigger,
    run_transition,
    transition,
)

S = Status
T = Trigger

LEGAL_PATHS = [
    pytest.param(
        S.IDLE,
        [(T.ENQUEUE, S.QUEUED), (T.START, S.RUNNING), (T.FINISH, S.FINISHED)],
        id="idle-queued-running-finished",
    ),
    pytest.param(
        S.IDLE,
        [(T.ENQUEUE, S.QUEUED), (T.START, S.RUNNING), (T.FAIL, S.ERROR)],
        id="idle-queued-running-error",
    ),
    pytest.param(
        S.IDLE,
        [(T.ENQUEUE, S.QUEUED), (T.START, S.RUNNING), (T.STOP, S.PAUSED)],
        id="idle-queued-running-paused",
    ),
    pytest.param(S.IDLE, [(T.ENQUEUE, S.QUEUED), (T.STOP, S.PAUSED)], id="queued-paused"),
    pytest.param(
        S.QUEUED,
        [(T.START, S.RUNNING), (T.REQUEST_PAUSE, S.PAUSING), (T.STOP, S.PAUSED)],
        id="running-pausing-paused",
    ),
    pytest.param(
        S.QUEUED,
        [(T.START, S.RUNNING), (T.REQUEST_PAUSE, S.PAUSING), (T.FINISH, S.FINISHED)],
        id="pausing-finished",
    ),
    pytest.param(
        S.QUEUED,
        [(T.START, S.RUNNING), (T.REQUEST_PAUSE, S.PAUSING), (T.FAIL, S.ERROR)],
        id="pausing-error",
    ),
    pytest.param(S.PAUSED, [(T.ENQUEUE, S.QUEUED), (T.START, S.RUNNING)], id="paused-queued-again"),
    pytest.param(
        S.FINISHED, [(T.ENQUEUE, S.QUEUED), (T.START, S.RUNNING)], id="finished-queued-again"
    ),
    pytest.param(S.ERROR, [(T.ENQUEUE, S.QUEUED), (T.STOP, S.PAUSED)], id="error-queued-again"),
    pytest.param(
        S.IDLE,
        [
            (T.ENQUEUE, S.QUEUED),
            (T.START, S.RUNNING),
            (T.FINISH, S.FINISHED),
            (T.ENQUEUE, S.QUEUED),
            (T.START, S.RUNNING),
            (T.REQUEST_PAUSE, S.PAUSING),
            (T.STOP, S.PAUSED),
            (T.ENQUEUE, S.QUEUED),
        ],
        id="two-runs-then-requeued",
    ),
]

ILLEGAL_PAIRS = [
    pytest.param(status, trigger, id=f"{status}-{trigger}")
    for status, trigger in itertools.product(Status, Trigger)
    if trigger not in TRANSITIONS.get(status, {})
]

NON_TERMINAL_PAIRS = [
    pytest.param(status, trigger, id=f"{status}-{trigger}")
    for status, trigger in itertools.product(Status, Trigger)
    if status not in TERMINAL
]


@pytest.mark.parametrize(("start", "steps"), LEGAL_PATHS)
def test_transition_walks_legal_path(start: Status, steps: list[tuple[Trigger, Status]]) -> None:
    """Every step of a legal path leads to the status the table names."""
    status = start
    for trigger, expected in steps:
        status = transition(status, trigger)
        assert status is expected


def test_transition_legal_paths_cover_every_edge() -> None:
    """The walked paths together use every edge of the table, so no edge goes untested."""
    walked = set()
    for param in LEGAL_PATHS:
        status, steps = param.values
        for trigger, target in steps:
            walked.add((status, trigger, target))
            status = target
    table = {
        (status, trigger, target)
        for status, edges in TRANSITIONS.items()
        for trigger, target in edges.items()
    }
    assert walked == table


def test_transition_illegal_pairs_are_generated() -> None:
    """The illegal pairs are exactly all (status, trigger) pairs minus the 13 table edges."""
    edges = sum(len(edges) for edges in TRANSITIONS.values())
    assert edges == 13
    assert len(ILLEGAL_PAIRS) == len(Status) * len(Trigger) - edges == 29


@pytest.mark.parametrize(("status", "trigger"), ILLEGAL_PAIRS)
def test_transition_refuses_pair_not_in_table(status: Status, trigger: Trigger) -> None:
    """A pair the table lacks raises IllegalTransition (409) naming both, table unchanged."""
    before = copy.deepcopy(TRANSITIONS)
    with pytest.raises(IllegalTransition) as info:
        transition(status, trigger)
    error = info.value
    assert isinstance(error, Conflict)
    assert (error.status, error.code) == (409, "illegal_transition")
    assert error.detail == {"status": status.value, "trigger": trigger.value}
    assert status.value in error.message
    assert trigger.value.replace("_", " ") in error.message
    assert before == TRANSITIONS


@pytest.mark.parametrize(
    ("status", "trigger"),
    [
        pytest.param(status, trigger, id=f"{status}-{trigger}")
        for status, trigger in itertools.product(sorted(TERMINAL), Trigger)
    ],
)
def test_run_transition_refuses_every_trigger_from_terminal(
    status: Status, trigger: Trigger
) -> None:
    """A run that has ended never moves again, not even with enqueue."""
    with pytest.raises(IllegalTransition) as info:
        run_transition(status, trigger)
    assert info.value.status == 409
    assert info.value.detail == {"status": status.value, "trigger": trigger.value}
    assert "start a new run" in info.value.message


@pytest.mark.parametrize(("status", "trigger"), NON_TERMINAL_PAIRS)
def test_run_transition_matches_transition_outside_terminal(
    status: Status, trigger: Trigger
) -> None:
    """For a status that is not terminal, run_transition agrees with transition exactly."""
    if trigger in TRANSITIONS[status]:
        assert run_transition(status, trigger) is transition(status, trigger)
    else:
        with pytest.raises(IllegalTransition):
            run_transition(status, trigger)


def test_lifecycle_table_has_a_row_for_every_status() -> None:
    """Every status is a row of the table and every target is a Status."""
    assert set(TRANSITIONS) == set(Status)
    for edges in TRANSITIONS.values():
        assert all(isinstance(target, Status) for target in edges.values())


def test_lifecycle_active_terminal_idle_partition_statuses() -> None:
    """ACTIVE, TERMINAL and idle are disjoint and together are every status."""
    assert {S.QUEUED, S.RUNNING, S.PAUSING} == ACTIVE
    assert {S.PAUSED, S.FINISHED, S.ERROR} == TERMINAL
    assert not ACTIVE & TERMINAL
    assert S.IDLE not in ACTIVE | TERMINAL
    assert ACTIVE | TERMINAL | {S.IDLE} == set(Status)


@pytest.mark.parametrize("status", [pytest.param(s, id=s.value) for s in (*TERMINAL, S.IDLE)])
def test_lifecycle_resting_status_only_enqueues(status: Status) -> None:
    """A terminal or idle status has exactly one out-edge: enqueue to queued."""
    assert TRANSITIONS[status] == {T.ENQUEUE: S.QUEUED}


@pytest.mark.parametrize("status", [pytest.param(s, id=s.value) for s in sorted(ACTIVE)])
def test_lifecycle_active_status_can_stop_but_not_enqueue(status: Status) -> None:
    """An active status stops to paused (crash recovery relies on it) and never enqueues."""
    assert TRANSITIONS[status][T.STOP] is S.PAUSED
    assert T.ENQUEUE not in TRANSITIONS[status]


def test_lifecycle_active_edges_stay_active_or_end() -> None:
    """Every edge out of an active status leads to an active or a terminal status."""
    for status in ACTIVE:
        for target in TRANSITIONS[status].values():
            assert target in ACTIVE | TERMINAL


def test_lifecycle_idle_is_never_reentered() -> None:
    """No edge leads back to idle: a conversation is idle only before its first run."""
    targets = {target for edges in TRANSITIONS.values() for target in edges.values()}
    assert S.IDLE not in targets


def test_lifecycle_every_status_reachable_from_idle() -> None:
    """Following the table from idle reaches every status."""
    seen = {S.IDLE}
    frontier = [S.IDLE]
    while frontier:
        for target in TRANSITIONS[frontier.pop()].values():
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    assert seen == set(Status)
