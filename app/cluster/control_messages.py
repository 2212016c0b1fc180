"""The control channel's messages: pause and interrupt requests between nodes, and replies.

A node asks another to stop a conversation's runs, and the other replies once it has
(``app/cluster/control.py``), over LISTEN/NOTIFY on the channel of the Trellis schema
(:func:`control_channel`: one database may hold several schemas, as the tests' does)::

    "<action> <run_id> <target node> <tag>"   node <target>: <action> the run's conversation
    "done <tag> <target node>"                <target> has done it (or has no such run)

``action`` is ``pause``, ``interrupt`` or ``delete``; ``tag`` (``<asking node>.<n>``) names
one asking and carries no space, as node and run ids do not. A message is a hint, as a
change note is (``app/store/change_notes.py``): the truth is read from the store. Every
message is far under PostgreSQL's 8000-byte payload limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.stopping import STOP_REASONS, StopAction
from app.store.change_notes import channel_name

#: Sends a list of payloads with one statement (``%s``: the channel, a text[] of payloads).
NOTIFY_ALL = "SELECT pg_notify(%s, payload) FROM unnest(%s::text[]) AS payload"


def control_channel(schema: str) -> str:
    """The control channel of the Trellis store in ``schema``."""
    return channel_name("control", schema)


@dataclass(frozen=True, slots=True)
class Request:
    """``target``: do ``action`` to the conversation of ``run_id``; reply with ``tag``."""

    action: StopAction
    run_id: str
    target: str
    tag: str

    def payload(self) -> str:
        return f"{self.action} {self.run_id} {self.target} {self.tag}"


@dataclass(frozen=True, slots=True)
class Reply:
    """``node`` has done the request tagged ``tag``."""

    tag: str
    node: str

    def payload(self) -> str:
        return f"done {self.tag} {self.node}"


def parse(payload: str) -> Request | Reply | None:
    """The message in ``payload``, or ``None`` if it is not one (logged by the caller)."""
    parts = payload.split(" ")
    if len(parts) == 3 and parts[0] == "done" and all(parts):
        return Reply(parts[1], parts[2])
    if len(parts) == 4 and parts[0] in STOP_REASONS and all(parts):
        action: StopAction = next(a for a in STOP_REASONS if a == parts[0])
        return Request(action, parts[1], parts[2], parts[3])
    return None
