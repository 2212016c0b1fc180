"""Process-wide thread settings: the worker threads' stack size and glibc's malloc arenas.

Why this module exists: every run is one OS thread (``app/run_task.py``), and a node is
meant to hold 10,000 runs in flight within 512 MiB. What a thread costs is decided here,
once, before the first worker thread starts.

Stack size (``thread_stack_size_kib``, default 1 MiB):
    A thread's stack is reserved address space (8 MiB by default on Linux: ``ulimit -s``);
    only the pages a thread touches become resident. So the size does *not* change what a
    run costs in memory — the real server held 5,000 sleeping runs in 501 MiB with 8 MiB
    stacks and in 501 MiB with 256 KiB ones; a run thread touches 20 to 34 KiB of its stack
    (``/proc/PID/smaps``), a bare Python thread 8 KiB. What the size decides:

    * how deep C code may recurse before the process dies. A stack overflow is a SIGSEGV
      that takes every run of the server with it, so the size must hold the deepest
      realistic work with room to spare. Python 3.11 makes Python-to-Python calls without
      C recursion; what recurses in C is json, pydantic-core, ``repr``, and Python code
      re-entered from C (``__init__``, ``__getattr__``, properties, ``map``). Measured in
      a thread of each size (Python 3.11.7, glibc 2.36, pydantic-core 2): the whole llm,
      streaming, tool-call, file_editor and terminal test suites pass at 32 KiB; pydantic
      validating and serializing a value nested as deep as a request may be
      (``json_limits.MAX_DEPTH``, 64) needs 96 KiB (crash at 64); runaway recursion ends in
      a clean ``RecursionError`` at 256 KiB for ``repr``/``json``, 512 KiB for ``__init__``
      and ``__str__``, 768 KiB for ``map``, ``__getattr__`` and properties; ``sorted(key=)``
      recursion needs 4 MiB and a recursive pydantic model fed 100,000 levels 8 MiB.
      1 MiB is ~10x the deepest realistic need and turns all but the last two into a
      ``RecursionError`` of one run; 128 KiB is the least the settings accept.
    * how much address space and commit charge 10,000 threads reserve: 10 GiB at 1 MiB,
      80 GiB at 8 MiB (which a host with ``vm.overcommit_memory=2`` or ``ulimit -v``
      refuses). Stacks of 2 MiB or more can also be backed by transparent huge pages when
      THP is ``always`` (2 MiB resident per thread; not measured here: this machine has
      ``madvise``); 1 MiB stacks never are.

    The size is *process-global*: :func:`threading.stack_size` applies to every thread the
    ``threading`` module starts afterwards — Trio's thread cache (run, io, tool and start-up
    threads alike), and any thread an embedder's own code starts. Threads that already exist
    keep their size, which is why :func:`apply_thread_settings` must run before the first
    ``trio.to_thread`` call (``python -m app serve`` calls it first thing; an embedder calls
    it before ``trio.run``). Idle threads in Trio's cache (up to 10 s old) keep theirs, and
    the size is a minimum: glibc may give a new thread the cached stack of an exited one
    that is bigger (up to 4x).

malloc arenas (:data:`MALLOC_ARENA_MAX`, not a setting):
    glibc gives threads that contend on ``malloc`` arenas of their own, up to 8 per core;
    Python's small objects come from its own allocator (pymalloc), but thread states and
    what C code (SQLite, OpenSSL) allocates come from ``malloc``. ``mallopt(M_ARENA_MAX, n)``
    caps the count. Measured with the real server (2 cores, sleeping script runs): 10,000
    runs in flight took 813.6 MiB with glibc's default, 808.5 with 2 arenas, 808.8 with 1;
    1,000 runs 148.3-148.5 MiB against 143.0-144.3 with 1, 2 or 4 (two runs each). The
    arenas cost ~5 MiB *in all* (there are at most 16 here), not per run, and server CPU per
    run start did not move beyond the noise (7.7-12.2 ms in every configuration). A cap
    would save <1% at 10,000 runs while serializing C-level allocation (outside the GIL) on
    many-core hosts, so glibc's default stays; the knob is here, one constant, should the
    numbers change.

Errors:
    :func:`apply_thread_settings` raises ``ValueError`` for a stack size the platform refuses
    (settings validation rejects those first) and ``OSError`` when ``mallopt`` fails.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

from app.settings import Settings

__all__ = [
    "MALLOC_ARENA_MAX",
    "apply_thread_settings",
    "current_thread_stack_bytes",
    "glibc_version",
    "set_malloc_arena_max",
    "set_thread_stack_size",
]

log = logging.getLogger("trellis")

#: glibc's arena cap; 0 keeps glibc's default (see the module docstring for why).
MALLOC_ARENA_MAX = 0
_M_ARENA_MAX = -8  # <malloc.h>


def apply_thread_settings(settings: Settings) -> None:
    """Apply ``thread_stack_size_kib`` and :data:`MALLOC_ARENA_MAX` to this whole process.

    Call it before any worker thread starts (before ``trio.to_thread`` is first used):
    ``python -m app serve`` does; an embedder of ``open_run_supervisor`` should too. Calling
    it again is harmless; it affects only threads started afterwards.
    """
    set_thread_stack_size(settings.thread_stack_size_kib)
    set_malloc_arena_max(MALLOC_ARENA_MAX)


def set_thread_stack_size(kib: int) -> None:
    """Stack size of every thread started from now on (0: the platform's default)."""
    threading.stack_size(kib * 1024)


def set_malloc_arena_max(arenas: int) -> bool:
    """``mallopt(M_ARENA_MAX, arenas)`` on glibc; 0 or another C library: nothing.

    Returns whether the cap was set. Errors: ``OSError`` if glibc refuses the value.
    """
    if arenas == 0:
        return False
    if glibc_version() is None:
        log.debug("malloc arena cap ignored: not glibc")
        return False
    libc = ctypes.CDLL(None)
    if libc.mallopt(_M_ARENA_MAX, arenas) != 1:  # mallopt returns 1 on success, 0 on error
        raise OSError(f"mallopt(M_ARENA_MAX, {arenas}) failed")
    return True


def glibc_version() -> str | None:
    """glibc's version (``"2.36"``), or None when the C library is not glibc."""
    try:
        value = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    if not value or not value.startswith("glibc "):
        return None
    return value.removeprefix("glibc ")


def current_thread_stack_bytes() -> int | None:
    """The calling thread's stack size as the C library reports it (``pthread_getattr_np``);
    None where that call does not exist (not glibc). A diagnostic: it observes the thread,
    it does not read the setting back."""
    if glibc_version() is None:
        return None
    libc = ctypes.CDLL(None)
    libc.pthread_self.restype = ctypes.c_ulong
    libc.pthread_getattr_np.argtypes = [ctypes.c_ulong, ctypes.c_void_p]
    attr = ctypes.create_string_buffer(256)  # pthread_attr_t: 56 bytes on x86-64 glibc
    if libc.pthread_getattr_np(libc.pthread_self(), attr) != 0:
        return None
    try:
        address, size = ctypes.c_void_p(), ctypes.c_size_t()
        if libc.pthread_attr_getstack(attr, ctypes.byref(address), ctypes.byref(size)) != 0:
            return None
        return size.value
    finally:
        libc.pthread_attr_destroy(attr)
