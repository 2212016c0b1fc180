"""Workspaces shared by name: never delete one that another conversation's run works in.

A conversation works in ``workspaces_dir/<its id>``, or in a directory it names
(``workspace`` at creation), which other conversations may name too. Deleting a
conversation with ``delete_workspace`` removes that directory — unless an active run of
*another* conversation works in it: then the request is refused (409
``workspace_in_use``) before anything is deleted, and checked again right before the
directory is removed (a run may have started in it meanwhile; the files are then kept).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from app.errors import Conflict
from app.handles import RunHandle
from app.records import ConversationRecord

log = logging.getLogger("trellis.supervisor")


class WorkspaceInUse(Conflict):
    """Another conversation's active run works in the workspace; nothing was deleted."""

    code = "workspace_in_use"


def check_workspace_free(conversation: ConversationRecord, runs: Iterable[RunHandle]) -> None:
    """Errors: :class:`WorkspaceInUse` when a run of another conversation uses the
    conversation's workspace."""
    users = [
        handle.conversation_id
        for handle in runs
        if handle.workspace == conversation.workspace and handle.conversation_id != conversation.id
    ]
    if users:
        raise WorkspaceInUse(
            f"the workspace {conversation.workspace!r} is used by an active run of another"
            " conversation; delete without delete_workspace, or stop that run first",
            detail={"workspace": conversation.workspace, "conversation_id": users[0]},
        )


async def delete_workspace(
    conversation: ConversationRecord,
    runs: Iterable[RunHandle],
    root: Path,
    io: Callable[..., Awaitable[Any]],
) -> None:
    """Remove the conversation's workspace under ``root`` (in a thread, through ``io``),
    unless a run of another conversation started in it meanwhile (logged, kept)."""
    try:
        check_workspace_free(conversation, runs)
    except WorkspaceInUse:
        log.warning("workspace %r kept: a run started in it meanwhile", conversation.workspace)
        return
    await io(shutil.rmtree, root / conversation.workspace, ignore_errors=True)
