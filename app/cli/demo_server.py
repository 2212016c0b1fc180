"""The demo's servers: an embedded ``python -m app serve`` it owns, and following a
server's run changes on its server-wide stream.

Ownership: :func:`open_embedded_server` owns the child process — it stops it if it is
still alive on the way out (an error, Ctrl-C: SIGTERM, then SIGKILL) and deletes its data
directory. :func:`follow_server` is a task of the phase's nursery: cancelled with it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from app.cli.demo_view import Drain, PhaseBoard
from app.client._async import _close_body
from app.client._errors import connection_errors, error_from_response
from app.client._requests import ClientOptions
from app.client._sse import SSEParser

BANNER_TIMEOUT_SECONDS = 30.0  # a cold start here takes ~1 s (bench/server_process.py)
STOP_TIMEOUT_SECONDS = 15.0  # > shutdown_grace_seconds (10 s default) + 1 s, then SIGKILL
BANNER = re.compile(r"trellis: serving on (http://\S+)")


class DemoError(Exception):
    """The embedded server did not start."""


@dataclass
class EmbeddedServer:
    """A ``python -m app serve`` child process and its address."""

    process: trio.Process
    url: str

    async def terminate(self) -> Drain:
        """SIGTERM, and wait for the exit: its code, and the seconds it took."""
        started = trio.current_time()
        await _terminate(self.process)
        return Drain(self.process.returncode, trio.current_time() - started)


@asynccontextmanager
async def open_embedded_server(
    *, slots: int, queued: int, naive: bool
) -> AsyncIterator[EmbeddedServer]:
    """Start a server in a fresh temporary data directory; wait for its banner.

    Its environment has no ``TRELLIS_*`` variable (they configure the user's servers,
    not the demo's). Its log (stderr) goes to a file; a server that fails to start is a
    :class:`DemoError` quoting the log's last lines.
    """
    directory = Path(tempfile.mkdtemp(prefix="trellis-demo-"))
    log_path = directory / "server.log"
    command = [sys.executable, "-m", "app", "serve", "--port", "0"]
    command += ["--data-dir", str(directory / "data"), "--sandbox", "none"]
    command += ["--max-concurrent-runs", str(slots)]
    command += ["--max-queued-runs", str(queued), "--log-level", "warning"]
    command += ["--naive-mode"] if naive else []
    env = {name: value for name, value in os.environ.items() if not name.startswith("TRELLIS_")}
    try:
        with log_path.open("wb") as log:
            # Its own session: a Ctrl-C in the terminal reaches the demo only, which then
            # stops the server with one SIGTERM (a second signal would cut its drain short).
            process = await trio.lowlevel.open_process(
                command, stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True
            )
        try:
            yield EmbeddedServer(process, await _read_banner(process, log_path))
        finally:
            with trio.CancelScope(shield=True):  # an error or Ctrl-C: the server goes too
                if process.returncode is None:
                    await _terminate(process)
                if process.stdout is not None:
                    await process.stdout.aclose()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def _read_banner(process: trio.Process, log_path: Path) -> str:
    assert process.stdout is not None
    output = b""
    with trio.move_on_after(BANNER_TIMEOUT_SECONDS):
        while chunk := await process.stdout.receive_some():
            output += chunk
            if match := BANNER.search(output.decode(errors="replace")):
                return match.group(1)
    text = await trio.Path(log_path).read_text(errors="replace")
    tail = "\n".join(text.splitlines()[-10:])
    raise DemoError(f"the embedded server did not start; its log ends:\n{tail}")


async def _terminate(process: trio.Process) -> None:
    """SIGTERM; SIGKILL if the process outlives :data:`STOP_TIMEOUT_SECONDS`."""
    process.send_signal(signal.SIGTERM)
    with trio.move_on_after(STOP_TIMEOUT_SECONDS):
        await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


async def follow_server(
    options: ClientOptions,
    board: PhaseBoard,
    ended: trio.Event,
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    """Feed ``board`` the server stream's ``status`` frames until its ``end`` (or until
    the connection breaks: the server is gone); then set ``ended``. Started once
    subscribed, so no change of the demo's runs is missed."""
    async with httpx.AsyncClient(**options.httpx_arguments()) as http:
        request = http.build_request("GET", "/api/events/stream", timeout=options.stream_timeouts)
        with connection_errors():
            response = await http.send(request, stream=True)
        try:
            if response.is_error:
                await response.aread()
                raise error_from_response(response)
            task_status.started()
            await _read_frames(response, board)
        finally:
            await response.aclose()
            ended.set()


async def _read_frames(response: httpx.Response, board: PhaseBoard) -> None:
    parser, lines = SSEParser(), response.aiter_lines()
    try:
        async for line in lines:
            frame = parser.feed(line)
            if frame is None:
                continue
            if frame.event == "status":
                board.status_frame(json.loads(frame.data))
            elif frame.event == "end":
                board.stream_end = str(json.loads(frame.data).get("reason"))
                return
    except httpx.TransportError:
        return  # the server exited (its final frames, if any, came before)
    finally:
        await _close_body(lines)
