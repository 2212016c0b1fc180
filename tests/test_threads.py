"""Worker thread stack size (``thread_stack_size_kib``) and malloc arenas (app/threads.py).

What is observed is the threads themselves (``pthread_getattr_np`` inside the thread), never
the setting read back: in-process for a thread started after :func:`apply_thread_settings`,
and in a real ``serve`` subprocess for a run thread and a tool thread. A stack too small for
the deepest realistic run work crashes a subprocess; the default and the minimum do not.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.settings import MIN_THREAD_STACK_SIZE_KIB, Settings, SettingsError, load_settings
from app.threads import (
    apply_thread_settings,
    current_thread_stack_bytes,
    glibc_version,
    set_malloc_arena_max,
)
from tests.test_process import Server, events_of, servers

__all__ = ["servers"]  # the fixture, shared with test_process.py

PROGRAMS = Path(__file__).parent / "programs"
STACK_PROBE_SERVER = PROGRAMS / "stack_probe_server.py"
REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_SECONDS = 10.0  # a one-step run takes ~50 ms; only a hang gets near this
KIB = 1024

needs_glibc = pytest.mark.skipif(glibc_version() is None, reason="pthread_getattr_np: glibc")


@pytest.fixture
def restore_stack_size() -> Iterator[None]:
    """The size is process-global: put back what the test process had."""
    before = threading.stack_size()
    yield
    threading.stack_size(before)


def stack_of_new_thread() -> int | None:
    seen: list[int | None] = []
    thread = threading.Thread(target=lambda: seen.append(current_thread_stack_bytes()))
    thread.start()
    thread.join(timeout=RUN_TIMEOUT_SECONDS)
    return seen[0]


# -- the setting ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["16", "64", "124", "130", "-4", "1048580", "1M"])
def test_unusable_sizes_are_rejected_naming_the_source(value: str) -> None:
    with pytest.raises(SettingsError, match=f"env TRELLIS_THREAD_STACK_SIZE_KIB='{value}'"):
        load_settings(environ={"TRELLIS_THREAD_STACK_SIZE_KIB": value})


@pytest.mark.parametrize("value", [0, MIN_THREAD_STACK_SIZE_KIB, 384, 8192])
def test_usable_sizes_are_accepted_from_the_environment(value: int) -> None:
    settings = load_settings(environ={"TRELLIS_THREAD_STACK_SIZE_KIB": str(value)})
    assert settings.thread_stack_size_kib == value


def test_flag_overrides_the_environment() -> None:
    environ = {"TRELLIS_THREAD_STACK_SIZE_KIB": "256"}
    assert load_settings(environ=environ, thread_stack_size_kib=512).thread_stack_size_kib == 512


# -- applying it ----------------------------------------------------------------------------


@needs_glibc
@pytest.mark.usefixtures("restore_stack_size")
def test_threads_started_after_apply_get_the_configured_stack() -> None:
    # glibc hands a new thread a cached stack of an exited one when that is big enough (up
    # to 4x the size asked for), so ask for more than any thread of this process had.
    apply_thread_settings(Settings(thread_stack_size_kib=12 * 1024))
    assert stack_of_new_thread() == 12 * 1024 * KIB


@needs_glibc
def test_arena_cap_is_set_on_glibc_and_zero_leaves_the_default() -> None:
    # glibc's own cap (8 arenas per core) changes nothing in this process but proves the call
    # goes through; 0 must not call mallopt at all.
    assert set_malloc_arena_max(8 * (os.cpu_count() or 1)) is True
    assert set_malloc_arena_max(0) is False


@needs_glibc
@pytest.mark.slow
def test_serve_applies_the_size_to_run_and_tool_threads(
    tmp_path: Path, servers: list[Server]
) -> None:
    for flags, expected_kib in [
        (("--thread-stack-size-kib", "384"), 384),
        ((), Settings().thread_stack_size_kib),  # the default applies without a flag too
    ]:
        data_dir = tmp_path / str(expected_kib)
        servers.append(server := Server(data_dir, *flags, program=STACK_PROBE_SERVER))
        expected = f"run={expected_kib * KIB} tool={expected_kib * KIB}"
        assert probe_message(server) == expected
        code, _, stderr = server.stop(signal.SIGTERM)
        assert code == 0, stderr


def probe_message(server: Server) -> str:
    """Run the probe to its end (the server's own wait, no polling); its one message."""
    body = {"agent": {"kind": "stack_probe"}, "run": True}
    created = server.json("POST", "/api/conversations", json=body)
    conversation_id, run_id = created["id"], created["run"]["id"]
    wait = f"/api/conversations/{conversation_id}/runs/{run_id}/wait"
    ended = server.json(
        "GET", f"{wait}?timeout={RUN_TIMEOUT_SECONDS}", timeout=RUN_TIMEOUT_SECONDS + 5
    )
    events = events_of(server, conversation_id)
    assert ended["status"] == "finished", (ended, events)
    [text] = [e["payload"]["text"] for e in events if e["kind"] == "message"]
    return str(text)


# -- the default has room -------------------------------------------------------------------

#: The deepest realistic work of a run thread: pydantic validating and serializing a value
#: nested as deep as a request may be (app/api/json_limits.py MAX_DEPTH), in a worker thread
#: started after set_thread_stack_size. Measured: crashes at 64 KiB, passes at 96.
DEEP_WORK = textwrap.dedent(
    """
    import sys, trio, pydantic, pydantic_core
    from app.api.json_limits import MAX_DEPTH
    from app.threads import set_thread_stack_size

    def work():
        value = []
        for _ in range(MAX_DEPTH - 1):
            value = [value, {"k": "v"}]
        checked = pydantic.TypeAdapter(object).validate_python(value)
        return pydantic_core.from_json(pydantic_core.to_json(checked)) == value

    set_thread_stack_size(int(sys.argv[1]))
    assert trio.run(trio.to_thread.run_sync, work)
    """
)


def run_deep_work(stack_kib: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", DEEP_WORK, str(stack_kib)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
def test_deep_run_work_fits_the_default_and_the_minimum_not_half_of_it() -> None:
    for kib in (Settings().thread_stack_size_kib, MIN_THREAD_STACK_SIZE_KIB):
        done = run_deep_work(kib)
        assert done.returncode == 0, (kib, done.stderr[-2000:])
    too_small = run_deep_work(MIN_THREAD_STACK_SIZE_KIB // 2)
    assert too_small.returncode == -signal.SIGSEGV, too_small.stderr[-2000:]
