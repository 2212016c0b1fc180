"""The real Trellis server as a subprocess, plus what ``/proc`` says about it.

``TrellisServer`` is a context manager: entering starts ``python -m app serve --port 0`` in a
fresh temporary data directory and waits for its banner; leaving always stops it (SIGTERM,
then SIGKILL if it outlives the grace period) and deletes the directory, also on error.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import raw_client

REPO = Path(__file__).resolve().parent.parent
BANNER = re.compile(r"trellis: serving on http://127\.0\.0\.1:(\d+)")
BANNER_TIMEOUT_SECONDS = 30.0  # a cold start on this machine kind takes ~1 s; 30x headroom
HEALTH_POLL_SECONDS = 0.002  # fine enough for a ~1 s measurement, cheap for the server
STOP_TIMEOUT_SECONDS = 15.0  # > shutdown_grace_seconds (10 s default) + 1 s, then SIGKILL
CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
UTIME_FIELD, STIME_FIELD = 14, 15  # 1-based field numbers of /proc/PID/stat in proc(5)


def python_executable() -> str:
    """The project's venv interpreter (``make bench`` runs us with it anyway)."""
    venv_python = REPO / ".venv" / "bin" / "python"
    return str(venv_python) if venv_python.exists() else sys.executable


class TrellisServer:
    """One ``python -m app serve`` process on 127.0.0.1 with a free port."""

    def __init__(self, *extra_args: str) -> None:
        self.extra_args = extra_args
        self.data_dir = Path(tempfile.mkdtemp(prefix="trellis-bench-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.seconds_to_banner = float("nan")
        self.seconds_to_healthy = float("nan")
        self.exit_code: int | None = None

    def __enter__(self) -> TrellisServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        """Start the server; record seconds from ``Popen`` to the banner and to ``/health``."""
        command = [python_executable(), "-m", "app", "serve", "--port", "0"]
        command += ["--data-dir", str(self.data_dir), *self.extra_args]
        log = (self.data_dir / "server.log").open("wb")  # stderr: the server's log lines
        started = time.perf_counter()
        self.process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=log)
        log.close()  # the child holds its own copy
        self.port = self._read_port(started + BANNER_TIMEOUT_SECONDS)
        self.seconds_to_banner = time.perf_counter() - started
        raw_client.wait_for_status(
            self.port, "/health", started + BANNER_TIMEOUT_SECONDS, HEALTH_POLL_SECONDS
        )
        self.seconds_to_healthy = time.perf_counter() - started

    def _read_port(self, deadline: float) -> int:
        assert self.process is not None and self.process.stdout is not None
        stdout = self.process.stdout
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            output = b""
            while (remaining := deadline - time.perf_counter()) > 0:
                if not selector.select(remaining):
                    continue
                chunk = os.read(stdout.fileno(), 4096)
                if not chunk:
                    break  # the server exited before printing its banner
                output += chunk
                if match := BANNER.search(output.decode(errors="replace")):
                    return int(match.group(1))
        raise RuntimeError(f"no banner from the server; stdout {output!r}; log: {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        path = self.data_dir / "server.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def rss_mib(self) -> float:
        """Resident set size (``VmRSS``) in MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # the value is in kB
        raise RuntimeError("no VmRSS line in /proc/PID/status")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the whole process (all threads, live and exited)."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        # The command name (field 1) may contain spaces; fields after it start past ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        offset = 3  # fields[0] here is field 3 (state) of proc(5)
        ticks = int(fields[UTIME_FIELD - offset]) + int(fields[STIME_FIELD - offset])
        return ticks / CLOCK_TICKS_PER_SECOND

    def terminate(self, timeout_seconds: float = STOP_TIMEOUT_SECONDS) -> tuple[int, float]:
        """SIGTERM, wait; SIGKILL if it is still alive after ``timeout_seconds``.

        Returns ``(exit code, seconds from SIGTERM to exit)``; a killed server reports -9.
        """
        assert self.process is not None
        if self.process.poll() is not None:
            self.exit_code = self.process.returncode
            return self.process.returncode, 0.0
        started = time.perf_counter()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        elapsed = time.perf_counter() - started
        self.exit_code = self.process.returncode
        return self.process.returncode, elapsed

    def close(self) -> None:
        """Stop the server if it still runs, and delete its data directory."""
        if self.process is not None:
            self.terminate()
            if self.process.stdout is not None:
                self.process.stdout.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)
