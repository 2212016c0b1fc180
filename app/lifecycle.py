"""The status table of conversations and runs. The table *is* the spec.

Rule 1: every status change of a conversation or a run goes through :func:`transition`.
Nothing else may assign a status. The store applies it inside the same transaction that
writes the ``status`` event, so a change is either fully recorded or not at all.

Rule 2: an illegal change raises :class:`~app.errors.IllegalTransition` and changes nothing.

Conversations and runs share the table. A run is born ``queued`` and ends in one of the
terminal statuses; a conversation is born ``idle`` and is ``enqueue``-d again for each run::

    idle ──enqueue──▶ queued ──start──▶ running ──finish──▶ finished
                        │                 │  │ ──fail────▶ error
                        │                 │  └─stop──────▶ paused
                        │           request_pause
                        │                 ▼
                        │              pausing ──stop / finish / fail──▶ paused / finished / error
                        └──stop (cancelled while queued)──▶ paused

    paused | finished | error | idle ──enqueue──▶ queued      (a new run; conversations only)
"""

from __future__ import annotations

import enum

from app.errors import IllegalTransition


class Status(enum.StrEnum):
    IDLE = "idle"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    FINISHED = "finished"
    ERROR = "error"


class Trigger(enum.StrEnum):
    ENQUEUE = "enqueue"  # a run was asked for
    START = "start"  # the run got a run slot and its thread started
    REQUEST_PAUSE = "request_pause"  # stop at the next step boundary
    STOP = "stop"  # stopped before its end: pause, interrupt, shutdown, deletion
    FINISH = "finish"  # the agent said it is done
    FAIL = "fail"  # the agent raised, or max_iterations was reached


TRANSITIONS: dict[Status, dict[Trigger, Status]] = {
    Status.IDLE: {Trigger.ENQUEUE: Status.QUEUED},
    Status.QUEUED: {Trigger.START: Status.RUNNING, Trigger.STOP: Status.PAUSED},
    Status.RUNNING: {
        Trigger.REQUEST_PAUSE: Status.PAUSING,
        Trigger.STOP: Status.PAUSED,
        Trigger.FINISH: Status.FINISHED,
        Trigger.FAIL: Status.ERROR,
    },
    Status.PAUSING: {
        Trigger.STOP: Status.PAUSED,
        Trigger.FINISH: Status.FINISHED,
        Trigger.FAIL: Status.ERROR,
    },
    Status.PAUSED: {Trigger.ENQUEUE: Status.QUEUED},
    Status.FINISHED: {Trigger.ENQUEUE: Status.QUEUED},
    Status.ERROR: {Trigger.ENQUEUE: Status.QUEUED},
}

#: Statuses in which a conversation has a run that holds, or waits for, a run slot.
ACTIVE: frozenset[Status] = frozenset({Status.QUEUED, Status.RUNNING, Status.PAUSING})

#: Statuses a run ends in. A run never leaves them (``enqueue`` starts a *new* run).
TERMINAL: frozenset[Status] = frozenset({Status.PAUSED, Status.FINISHED, Status.ERROR})


def transition(status: Status, trigger: Trigger) -> Status:
    """Return the status that ``trigger`` leads to from ``status``.

    Errors:
        :class:`~app.errors.IllegalTransition` when the table has no such edge.
    """
    try:
        return TRANSITIONS[status][trigger]
    except KeyError:
        raise IllegalTransition(
            f"cannot {trigger.value.replace('_', ' ')} when the status is {status.value}",
            detail={"status": status.value, "trigger": trigger.value},
        ) from None


def run_transition(status: Status, trigger: Trigger) -> Status:
    """Like :func:`transition`, for a run: a run that has ended is never re-queued."""
    if status in TERMINAL:
        raise IllegalTransition(
            f"run already ended ({status.value}); start a new run instead",
            detail={"status": status.value, "trigger": trigger.value},
        )
    return transition(status, trigger)
