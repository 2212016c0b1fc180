"""Where conversations work: a directory of their own, or a named one they may share.

Two namespaces under ``workspaces_dir``, so that no name can reach another conversation's
own directory::

    by-id/<conversation id>    a conversation created without ``workspace``: its alone
    named/<name>               a conversation of the ``default`` tenant created with
                               ``workspace: name``, shared by every one that names it
    tenants/<tenant>/<name>    the same for another tenant: a name is the tenant's own, so
                               two tenants naming "x" get two directories

(A name equal to another conversation's id is just a name: ``named/<that id>``, a different
directory.) A conversation's record says which: its ``workspace`` is its own id unless it
named one — and ids are server-made UUIDs, never chosen by a client.

Deleting a conversation with ``delete_workspace``: an own directory goes with it. A named one
is removed only when no other conversation (active or not) names it any more — counted in
the store *after* the conversation was deleted; otherwise it is kept and the log says so.
While an active run of another conversation works in it, the request is refused up front
(409 ``workspace_in_use``, nothing deleted), as before.

Data directories from before the two namespaces held ``workspaces_dir/<id or name>``. On
start-up :func:`migrate_legacy_layout` moves each into its namespace once (see there).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from app.errors import Conflict, NotFound
from app.handles import RunHandle
from app.principal import DEFAULT_TENANT
from app.records import ConversationRecord
from app.store.base import EventStore

log = logging.getLogger("trellis.supervisor")

BY_ID = "by-id"
NAMED = "named"
TENANTS = "tenants"
#: Written once the layout is current; a name cannot start with a dot, so no workspace clashes.
LAYOUT_MARKER = ".layout-v2"
#: Where the migration parks old directories while it sorts them (crash-safe: see below).
_LEGACY = ".legacy"


class WorkspaceInUse(Conflict):
    """Another conversation's active run works in the workspace; nothing was deleted."""

    code = "workspace_in_use"


def is_named(conversation: ConversationRecord) -> bool:
    """Whether the conversation works in a named (shareable) workspace."""
    return conversation.workspace != conversation.id


def workspace_key(conversation: ConversationRecord) -> str:
    """The conversation's workspace as a path relative to ``workspaces_path``: equal for
    two conversations exactly when they share the directory."""
    if not is_named(conversation):
        return f"{BY_ID}/{conversation.id}"
    if conversation.tenant == DEFAULT_TENANT:  # the layout from before tenants
        return f"{NAMED}/{conversation.workspace}"
    return f"{TENANTS}/{conversation.tenant}/{conversation.workspace}"


def workspace_path(root: Path, conversation: ConversationRecord) -> Path:
    """The conversation's workspace directory under ``root`` (``workspaces_path``)."""
    return root / workspace_key(conversation)


def check_workspace_free(conversation: ConversationRecord, runs: Iterable[RunHandle]) -> None:
    """Errors: :class:`WorkspaceInUse` when an active run of another conversation works in
    the conversation's named workspace (an own directory is never shared)."""
    if not is_named(conversation):
        return
    key = workspace_key(conversation)  # handles carry it (set at admission)
    users = [
        handle.conversation_id
        for handle in runs
        if handle.workspace == key and handle.conversation_id != conversation.id
    ]
    if users:
        raise WorkspaceInUse(
            f"the workspace {conversation.workspace!r} is used by an active run of another"
            " conversation; delete without delete_workspace (the files stay while any other"
            " conversation names the workspace)",
            detail={"workspace": conversation.workspace, "conversation_id": users[0]},
        )


async def delete_workspace(
    conversation: ConversationRecord,
    runs: Iterable[RunHandle],
    root: Path,
    store: EventStore,
    io: Callable[..., Awaitable[Any]],
) -> None:
    """Remove the (already deleted) conversation's workspace under ``root``, in a thread
    through ``io`` — unless it is named and another conversation still names it, or a run of
    another conversation started in it meanwhile (kept, logged)."""
    if is_named(conversation):
        try:
            check_workspace_free(conversation, runs)
        except WorkspaceInUse:
            log.warning("workspace %r kept: a run started in it meanwhile", conversation.workspace)
            return
        users = await io(
            store.count_conversations_with_workspace, conversation.workspace, conversation.tenant
        )
        if users:
            log.info(
                "workspace %r kept: %d other conversation(s) name it", conversation.workspace, users
            )
            return
    await io(shutil.rmtree, workspace_path(root, conversation), ignore_errors=True)


def migrate_legacy_layout(root: Path, store: EventStore) -> None:
    """Bring ``root`` to the two-namespace layout, once. Blocking: call it in a thread.

    A missing ``root`` is created (``0700``) with the layout. Otherwise, unless
    :data:`LAYOUT_MARKER` is there, every old ``root/<dir>`` is moved to ``by-id/<dir>``
    when ``<dir>`` is the id of a conversation with its own directory, and to
    ``named/<dir>`` when conversations name it; both (the old layout let a name equal an
    id, and the two shared files): copied to ``by-id``, moved to ``named``, so neither side
    loses a file. Directories of no conversation stay in ``root/.legacy``, logged.

    Crash-safe: old directories are first parked in ``.legacy`` (so that old workspaces
    *named* ``by-id`` or ``named`` cannot clash), then sorted out of it one rename at a time;
    a restart continues where it stopped. The marker is written last.
    """
    if (root / LAYOUT_MARKER).exists():
        return
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    legacy = root / _LEGACY
    if not legacy.exists():
        parking = root / f"{_LEGACY}.tmp"
        parking.mkdir(exist_ok=True)
        for entry in root.iterdir():
            if not entry.name.startswith(".") and entry.is_dir() and not entry.is_symlink():
                entry.rename(parking / entry.name)
        parking.rename(legacy)
    for namespace in (BY_ID, NAMED):
        (root / namespace).mkdir(exist_ok=True)
    for entry in sorted(legacy.iterdir()):
        _sort_legacy(entry, root, store)
    if left := sorted(entry.name for entry in legacy.iterdir()):
        log.warning("workspaces of no conversation left in %s: %s", legacy, ", ".join(left))
    else:
        legacy.rmdir()
    (root / LAYOUT_MARKER).write_text("workspaces: by-id/<conversation id>, named/<name>\n")


def _sort_legacy(entry: Path, root: Path, store: EventStore) -> None:
    """Move one parked directory to its namespace; leave it parked if no one uses it."""
    name = entry.name
    named = store.count_conversations_with_workspace(name) > 0
    try:
        own = not is_named(store.get_conversation(name))
    except NotFound:
        own = False
    if own and named and not (root / BY_ID / name).exists():  # shared by an id and a name
        copy = root / BY_ID / f".{name}.copy"
        shutil.rmtree(copy, ignore_errors=True)  # a copy a crash interrupted
        shutil.copytree(entry, copy, symlinks=True)
        copy.rename(root / BY_ID / name)
    if named:
        entry.rename(root / NAMED / name)
    elif own:
        entry.rename(root / BY_ID / name)
    if named or own:
        log.info("workspace %s moved to %s", name, "/".join(["by-id"] * own + ["named"] * named))
