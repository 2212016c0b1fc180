"""``serve(settings)``: one process serving the API on Hypercorn's trio worker.

On the way up, in this order, so that a server that cannot run touches nothing:

0. make the process non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``): ``/proc/<pid>/environ``,
   ``mem`` and friends then belong to root, so a command running as the server's user
   cannot read the secrets the server started with (root still can: run the server as an
   unprivileged user, or with the bwrap sandbox, where the server's processes are not in
   sight). It also means no core dumps, and debuggers need root;
   then apply the thread settings (:func:`~app.threads.apply_thread_settings`: worker
   threads' stack size, malloc arenas), before the first worker thread starts;
1. claim the data directory (:class:`~app.store.lock.DataDirLock`): a second server on the
   same directory fails here, before the database is opened — its crash recovery would
   otherwise pause the live server's runs. It is created ``0700`` and ``chmod``-ed so:
   only the server's user may enter it (the database, the workspaces, the lock);
2. open the store (in a thread, on a limiter of its own): an unwritable directory or a
   database that cannot be opened fails here, as one line. A PostgreSQL database is not
   claimed: several servers may share one, as the nodes of a cluster (each recovers only
   dead nodes' runs; see ``app/cluster/``);
3. choose the sandbox (:mod:`app.tools.sandbox`; ``auto`` probes bubblewrap once and logs
   a warning when it falls back to ``none``; an explicit ``bwrap`` that does not work is
   a one-line :class:`~app.tools.sandbox.SandboxUnavailable`);
4. bind and serve; print ``trellis: serving on URL`` (stdout's one line).

The directory's claim is held until ``serve`` returns, or by the kernel until the process
dies.

Signals (Hypercorn's programmatic ``serve`` installs no handler of its own, so we own them):

1. The first SIGTERM or SIGINT starts the drain *while the listeners are still open*:
   ``/ready`` answers 503, new runs get 503 ``shutting_down``, every queued and running run is
   stopped with reason ``shutdown`` and its thread joined. Only then does the shutdown
   trigger return, and Hypercorn closes the listeners and connections, runs
   ``after_serving`` (which finds nothing left to drain) and returns: exit code 0.
2. A second signal forces an immediate exit (code 1). Committed data is safe: every
   event is committed before it is returned, and SQLite's WAL survives a killed process.

If run threads have not returned after ``shutdown_grace_seconds`` (a custom agent blocking
without a cancellation point), their runs are recorded as paused and the process exits
with code 1, since threads cannot be killed.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import suppress
from functools import partial
from typing import Any

import hypercorn.trio
import trio
from hypercorn.config import Config as HypercornConfig
from quart_trio import QuartTrio

from app.agents.registry import AgentRegistry
from app.settings import Settings
from app.store.lock import DataDirError, DataDirLock
from app.store.opening import open_store
from app.supervisor import RunSupervisor
from app.threads import apply_thread_settings
from app.tools import sandbox
from app.web import create_app

log = logging.getLogger("trellis")

_PR_SET_DUMPABLE = 4  # <linux/prctl.h>


async def serve(
    settings: Settings,
    *,
    registry: AgentRegistry | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Claim the data directory, open the store, serve until a signal, drain; exit code.

    Embedders with their own agent kinds can serve them the same way::

        trio.run(functools.partial(serve, load_settings(), registry=my_registry))

    Errors:
        :class:`~app.store.lock.DataDirError` (``DataDirInUse`` for a directory another
        server holds) before anything is served or any data touched;
        :class:`~app.tools.sandbox.SandboxUnavailable` before anything is served. A port
        that cannot be bound raises Hypercorn's ``OSError`` inside an exception group.
    """
    make_undumpable()
    apply_thread_settings(settings)  # before the first worker thread: sizes are per start
    startup = trio.CapacityLimiter(1)  # blocking start-up I/O, never on Trio's default limiter
    lock = DataDirLock(settings.data_dir)
    await trio.to_thread.run_sync(claim_private_dir, lock, limiter=startup)
    try:
        store = await trio.to_thread.run_sync(open_store, settings, limiter=startup)
        try:
            mode = await trio.to_thread.run_sync(
                partial(sandbox.resolve, settings.sandbox, network=settings.sandbox_network),
                limiter=startup,
            )
            log.info("sandbox: %s", mode)
            app = create_app(settings, registry=registry, store=store)
            return await _serve_app(app, settings, task_status)
        finally:
            with trio.CancelScope(shield=True):  # closing is quick; a cancel must not skip it
                await trio.to_thread.run_sync(store.close, limiter=startup)
    finally:
        lock.release()


def make_undumpable() -> None:
    """``prctl(PR_SET_DUMPABLE, 0)`` for this process (Linux; a no-op elsewhere).

    Errors: ``OSError`` if the kernel refuses (it does not, for a process's own flag).
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_DUMPABLE, 0): {os.strerror(errno)}")


def claim_private_dir(lock: DataDirLock) -> None:
    """Create the data directory ``0700`` if needed, claim it, and ``chmod`` it ``0700``.

    Errors: :class:`DataDirError`, one line: the lock's (cannot create, not writable, in
    use), or the ``chmod``'s (say, the directory belongs to another user).
    """
    with suppress(OSError):  # what cannot be created is the lock's to report, in its words
        lock.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock.acquire()
    try:
        os.chmod(lock.data_dir, 0o700)
    except OSError as exc:
        lock.release()
        raise DataDirError(
            f"cannot make data directory {lock.data_dir} private (chmod 0700): {exc.strerror}"
        ) from None


def hypercorn_config(settings: Settings) -> HypercornConfig:
    """Hypercorn's configuration for ``settings``, slow-client limits set on purpose.

    Slow clients (slowloris): Hypercorn serves each connection in a task of its own, so
    idle or half-sent connections cost a socket and a little memory, never the event loop;
    what must be bounded is how long they are kept:

    - ``keep_alive_timeout`` (``keep_alive_timeout_seconds``): a connection's idle timer
      runs from the moment it is accepted (and again after each response) until a complete
      request head has arrived. It is *not* restarted by bytes arriving, so a client
      dripping its request line or headers is closed when it runs out, just as an idle one.
    - ``h11_max_incomplete_size`` (``max_header_bytes``): the request line plus headers
      may not grow beyond this; past it h11 answers 431 and the connection is closed.
    - ``read_timeout`` stays unset on purpose: it bounds *every* read, and the clients of
      an event stream or a WebSocket legitimately send nothing for hours. A body sent
      slowly is bounded instead by Quart's ``BODY_TIMEOUT`` (60 s, then 408), and its size
      by ``max_request_bytes``.
    """
    config = HypercornConfig()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.keep_alive_timeout = settings.keep_alive_timeout_seconds
    config.h11_max_incomplete_size = settings.max_header_bytes
    config.read_timeout = None
    config.accesslog = None  # app/web.py logs one line per request
    # Hypercorn's info lines only repeat "Running on ...": keep its warnings and errors, in
    # our format (the logger propagates to our handler instead of getting one of its own).
    config.errorlog = logging.getLogger("hypercorn.error")
    config.errorlog.setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))
    # Connections get little time once the drain is over: every run has already ended.
    config.graceful_timeout = min(settings.shutdown_grace_seconds, 1.0)
    return config


async def _serve_app(
    app: QuartTrio, settings: Settings, task_status: trio.TaskStatus[list[str]]
) -> int:
    config = hypercorn_config(settings)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def shutdown_trigger() -> None:
                signum = await anext(aiter(signals))
                log.info("%s received: draining", signal.Signals(signum).name)
                nursery.start_soon(_exit_on_second_signal, signals)
                await _drain(app.extensions["trellis.supervisor"])

            async def run_hypercorn(*, task_status: trio.TaskStatus[list[str]]) -> None:
                await hypercorn.trio.serve(
                    app, config, shutdown_trigger=shutdown_trigger, task_status=task_status
                )
                nursery.cancel_scope.cancel()  # the second-signal watcher is no longer needed

            binds: list[str] = await nursery.start(run_hypercorn)
            # What start-up allocated (modules, the app, its routes) lives as long as the
            # process: keep it out of the garbage collector's scans. Collections while
            # serving get cheaper, and the interpreter exits fast after the drain (SIGTERM
            # with 100 runs in flight: 0.51 s -> 0.20 s to exit, median of 3 on this machine).
            gc.freeze()
            # Each run in flight keeps ~150 tracked objects (task, thread, frames, handle),
            # and a full collection walks them all holding the GIL: 0.1-1.0 s each with
            # 1,500-3,000 runs in flight here, 3 of them while 1,500 runs were created (and
            # they found a few dozen cyclic objects). Young collections stay as they were;
            # full ones come 100x less often: none in that burst, longest pause 41 ms.
            gc.set_threshold(700, 10, 1000)
            # The node's address in the shared database (GET /api/cluster).
            app.extensions["trellis.supervisor"].advertise(binds[0])
            print(f"trellis: serving on {binds[0]}", flush=True)
            task_status.started(binds)
    log.info("stopped cleanly")
    return 0


async def _drain(supervisor: RunSupervisor) -> None:
    """Drain within ``shutdown_grace_seconds``. Threads that ignore cancellation longer
    are abandoned by the supervisor (their runs recorded ``paused``); a process cannot
    wait for them, so it exits with code 1 without them."""
    if await supervisor.drain("shutdown"):
        _hard_exit(1)


async def _exit_on_second_signal(signals: AsyncIterator[int]) -> None:
    signum = await anext(signals)
    log.warning("%s received again: exiting now", signal.Signals(signum).name)
    _hard_exit(1)


def _hard_exit(code: int) -> Any:
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)
