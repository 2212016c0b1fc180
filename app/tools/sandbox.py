"""Where a terminal command runs, and how every process it started is found and stopped.

Two modes (the ``sandbox`` setting; ``auto`` picks one once per process, see :func:`resolve`):

``bwrap``
    The command runs under bubblewrap in PID, IPC and UTS namespaces of its own (and a user
    namespace when the server is not root), with all capabilities dropped. Its filesystem is
    a fresh, read-only root holding read-only ``/usr``, ``/bin``, ``/lib*`` and ``/etc``, a
    fresh ``/proc`` and ``/dev``, a private ``/tmp``, and the workspace, bound at its own
    path: the only writable place besides that ``/tmp``. The data directory (database,
    lock), the other workspaces and the server's processes do not exist in there. The
    environment is exactly what the tool passes (``--clearenv`` + ``--setenv``).
    ``sandbox_network = false`` adds a network namespace with nothing but a loopback
    interface. ``--die-with-parent``: if the server dies, even of SIGKILL, the kernel kills
    the sandbox.
``none``
    The command runs as the server's user, in the workspace, with the passed environment:
    it can read whatever that user can read. Only the process tracking below applies.

Process tracking (both modes): every command gets a random id in its environment
(:data:`MARKER_VARIABLE`), inherited by everything it starts — ``setsid``, ``nohup``,
double forks included. :class:`CommandProcesses` finds the command's processes by that id
and by process group, and stops them all. Under bwrap there is a stronger guarantee: when
the sandbox's init (bwrap's own pid 1) ends, the kernel kills every process in its PID
namespace, id or not. Without bwrap, what tracking cannot catch: a process that removes the
id from its environment *and* leaves the process group (``setsid env -i …``), and a process
whose environment the server may not read (a setuid program, another user's).

Why not a subreaper wrapper or a cgroup: a cgroup needs delegation the server rarely has,
and a subreaper only adopts orphans while it lives — a command may kill it first. The id
costs nothing and survives every way of detaching that keeps the environment.

Linux only (``/proc``, pidfds, namespaces).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import trio

from app.settings import SandboxSetting

log = logging.getLogger("trellis.sandbox")

ActiveSandbox = Literal["bwrap", "none"]

#: The environment variable carrying a command's id. Not a secret: it only names the command.
MARKER_VARIABLE = "TRELLIS_COMMAND_ID"
#: System directories a command sees read-only (when present; symlinks stay symlinks).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
#: How long the start-up probe may take: bwrap starts in ~10 ms; a host that needs longer
#: has something wrong with it, and auto then falls back to none (with a warning).
_PROBE_TIMEOUT_SECONDS = 10.0
#: Threads scanning ``/proc``; never Trio's default limiter, never the tool limiter (the call
#: already holds its token). A scan reads every process's stat and environ files (a few ms
#: on a busy host: too long for the Trio thread); four threads serve many commands stopping
#: at once — a mass interrupt — without a thread each.
_PROC_SCAN_THREADS = trio.CapacityLimiter(4)
#: Poll interval while processes die: no kernel event says "none of these is left".
_POLL_SECONDS = 0.01


class SandboxUnavailable(RuntimeError):
    """``sandbox = "bwrap"`` was asked for, and bubblewrap does not work on this host."""


# -- choosing the mode ---------------------------------------------------------------------

_probed: dict[bool, str | None] = {}  # network -> None (bwrap works) or why it does not
_probe_lock = threading.Lock()
_warned = threading.Lock()  # acquired once, never released: the fallback warning is logged once


def bwrap_problem(*, network: bool = True) -> str | None:
    """Why bwrap cannot confine commands here, or ``None`` when it can. Blocking.

    Probed once per process (per ``network``): a real ``bwrap … -- /bin/true`` with every
    option a command gets, on a temporary workspace. Threads asking at once wait for the
    one probe.
    """
    with _probe_lock:
        if network not in _probed:
            _probed[network] = _probe(network)
        return _probed[network]


@functools.cache
def _bwrap_executable() -> str | None:
    """Where ``bwrap`` is on ``PATH`` (looked up once: every command needs it)."""
    return shutil.which("bwrap")


def _probe(network: bool) -> str | None:
    if _bwrap_executable() is None:
        return "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    with tempfile.TemporaryDirectory(prefix="trellis-probe-") as workspace:
        launch = prepare("true", Path(workspace), {}, sandbox="bwrap", network=network)
        try:
            done = subprocess.run(
                launch.argv,
                env=launch.env,
                pass_fds=launch.pass_fds,
                capture_output=True,
                timeout=_PROBE_TIMEOUT_SECONDS,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"bwrap did not run: {exc}"
        finally:
            launch.close()
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip() or f"exit code {done.returncode}"
        return f"bwrap cannot create a sandbox here: {why}"
    return None


def resolve(setting: SandboxSetting, *, network: bool = True) -> ActiveSandbox:
    """The mode commands run in. Blocking the first time (the probe); cached after.

    ``auto`` falls back to ``none`` with one warning in the log.

    Errors:
        :class:`SandboxUnavailable` for ``bwrap`` on a host where it does not work.
    """
    if setting == "none":
        return "none"
    problem = bwrap_problem(network=network)
    if problem is None:
        return "bwrap"
    if setting == "bwrap":
        raise SandboxUnavailable(f'sandbox = "bwrap", but {problem}')
    if _warned.acquire(blocking=False):  # once per process
        log.warning("sandbox auto: %s; commands run unconfined (sandbox none)", problem)
    return "none"


async def active(setting: SandboxSetting, *, network: bool = True) -> ActiveSandbox:
    """:func:`resolve` without blocking the Trio thread (the probe runs in a worker thread)."""
    if setting == "none" or network in _probed:
        return resolve(setting, network=network)  # probed already: never blocks
    return await trio.to_thread.run_sync(
        lambda: resolve(setting, network=network), limiter=_PROC_SCAN_THREADS
    )


# -- starting a command --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Launch:
    """How to start one command: its argv, the environment of the process we start, the
    descriptors to pass, and the command's id. :meth:`close` once started."""

    argv: list[str]
    env: dict[str, str]
    pass_fds: tuple[int, ...]
    marker: str

    def close(self) -> None:
        for fd in self.pass_fds:
            os.close(fd)


def prepare(
    command: str,
    workspace: Path,
    env: dict[str, str],
    *,
    sandbox: ActiveSandbox,
    network: bool = True,
) -> Launch:
    """The launch of ``bash -c command`` in ``workspace``, confined as ``sandbox`` says.

    Under bwrap, the options travel through a memfd (``--args``), not the command line:
    ``/proc/<pid>/cmdline`` is readable by every local user, and the ``--setenv`` values
    would be in it. bwrap itself starts with an empty environment, so its processes (the
    command's parent, pid 1 in the sandbox) hold nothing either.
    """
    marker = uuid.uuid4().hex
    command_env = {**env, MARKER_VARIABLE: marker}
    bash = ["/bin/bash", "-c", command]
    if sandbox == "none":
        return Launch(bash, command_env, (), marker)
    options = _bwrap_options(os.path.realpath(workspace), command_env, network)
    fd = os.memfd_create("trellis-bwrap-args")  # close-on-exec; pass_fds makes it inherited
    try:
        os.write(fd, b"".join(os.fsencode(option) + b"\0" for option in options))
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    bwrap = _bwrap_executable() or "bwrap"  # missing: Popen says so, and it is reported
    return Launch([bwrap, "--args", str(fd), "--", *bash], {}, (fd,), marker)


def _bwrap_options(workspace: str, env: dict[str, str], network: bool) -> list[str]:
    options = ["--unshare-pid", "--unshare-ipc", "--unshare-uts"]
    options += [] if network else ["--unshare-net"]
    # --new-session: no controlling terminal to push input into (TIOCSTI). --cap-drop ALL:
    # a root server's commands keep uid 0 but no capability (no mknod, mount, ptrace...).
    options += ["--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    for path in SYSTEM_DIRS:
        if os.path.islink(path):  # /bin -> usr/bin on merged-/usr systems
            options += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            options += ["--ro-bind", path, path]
    if network:  # /etc/resolv.conf may point there (systemd-resolved)
        options += ["--ro-bind-try", "/run/systemd/resolve", "/run/systemd/resolve"]
    options += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    options += ["--bind", workspace, workspace, "--chdir", workspace]  # after /tmp: may be in it
    options += ["--remount-ro", "/"]  # the directories bwrap made for the mount points
    options += ["--clearenv"]
    for name, value in env.items():
        options += ["--setenv", name, value]
    return options


# -- finding and stopping its processes ----------------------------------------------------


def exit_code(process: subprocess.Popen[bytes], *, wait: bool = True) -> int | None:
    """Our child's exit code (``-N``: killed by signal N) without reaping it; ``None`` if
    it still runs (``wait=False``). Blocks while it runs with ``wait``: call that once its
    pidfd is readable."""
    if process.returncode is not None:
        return process.returncode  # reaped already
    flags = os.WEXITED | os.WNOWAIT | (0 if wait else os.WNOHANG)
    info = os.waitid(os.P_PID, process.pid, flags)
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


class CommandProcesses:
    """Every live process of one command: our child's process group, plus every process
    carrying the command's id (:data:`MARKER_VARIABLE`) in its environment.

    ``process`` is our direct child: the shell (``none``) or the outer bwrap (``bwrap``);
    it leads its own session, so its pid is the group id. Under bwrap the group holds only
    bwrap's own processes, and the command's processes carry the id.

    Rule: our child is reaped only at the very end of :meth:`stop`. Until then it stays a
    zombie once it exits, so its pid — the group id we signal — cannot be reused by a
    stranger meanwhile (:func:`exit_code` reads its status without reaping it).
    """

    def __init__(self, process: subprocess.Popen[bytes], marker: str, *, confined: bool) -> None:
        self._process = process
        self._pgid = process.pid
        self._needle = f"\0{MARKER_VARIABLE}={marker}\0".encode()
        self._confined = confined

    async def stop(self, grace_seconds: float, killed_wait_seconds: float) -> None:
        """SIGTERM every process, SIGKILL after ``grace_seconds``; return once none is
        alive (zombies count as dead), or after ``killed_wait_seconds`` more (a process
        stuck in the kernel). Reaps our child. Shield it when it must finish.

        Under bwrap, SIGTERM goes to the command's processes, not to bwrap: bwrap does not
        pass signals on, and its death would SIGKILL the sandbox before the command could
        clean up. SIGKILL then goes to bwrap too: the kernel empties the PID namespace.
        """
        rounds = ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, killed_wait_seconds))
        for sig, seconds in rounds:
            with trio.move_on_after(seconds):
                await self._signal_until_gone(sig)
                break
        self._process.poll()  # reap: nothing signals the group any more

    async def _signal_until_gone(self, sig: signal.Signals) -> None:
        signalled: set[int] = set()
        spare_group = self._confined and sig == signal.SIGTERM
        while True:
            exited = exit_code(self._process, wait=False) is not None
            alive = await trio.to_thread.run_sync(self._scan, limiter=_PROC_SCAN_THREADS)
            if exited and not alive:
                return
            fresh = [(pid, grouped) for pid, grouped in alive if pid not in signalled]
            targets = [pid for pid, grouped in fresh if not (spare_group and grouped)]
            if targets:
                await trio.to_thread.run_sync(self._send, targets, sig, limiter=_PROC_SCAN_THREADS)
            signalled.update(pid for pid, _ in fresh)
            await trio.sleep(_POLL_SECONDS)

    def _scan(self) -> list[tuple[int, bool]]:
        """Live processes of the command, as ``(pid, in our child's group)``. Blocking."""
        found = []
        for name in os.listdir("/proc"):
            if name.isdigit() and (grouped := self._ours(int(name))) is not None:
                found.append((int(name), grouped))
        return found

    def _ours(self, pid: int) -> bool | None:
        """``True``: alive in the group; ``False``: alive with the id; ``None``: not ours
        (or dead, a zombie, or unreadable)."""
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            return None
        # Fields after the command name, which is in parentheses and may contain spaces:
        # state, ppid, pgrp, ...
        state, _, pgrp = stat[stat.rfind(b")") + 2 :].split(maxsplit=3)[:3]
        if state == b"Z":
            return None
        if int(pgrp) == self._pgid:
            return True
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return None
        return False if self._needle in b"\0" + environ else None

    def _send(self, pids: Sequence[int], sig: signal.Signals) -> None:
        """Signal each pid that is still ours. Through a pidfd, checked *after* opening it:
        the pidfd pins the process, so a pid reused by a stranger meanwhile is never hit."""
        for pid in pids:
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue  # gone
            try:
                if self._ours(pid) is not None:
                    signal.pidfd_send_signal(pidfd, sig)
            except ProcessLookupError:
                pass  # died meanwhile
            finally:
                os.close(pidfd)
