"""Keeping secrets out of sight: out of the environment, out of URLs, out of error text.

Text leaves the server in three ways — HTTP responses, log lines, and what the store keeps
(events, run errors) — and a secret must take none of them. Think of this module as the
server's shredder and its safe: secrets go into the safe once, at start-up, and every text
that may carry one goes through the shredder before anyone sees it.

* :func:`take_secret` moves a secret from the environment into memory, once: it is removed
  from ``os.environ`` *and* wiped from the process's initial environment block, so neither
  a command (``env``) nor ``/proc/<server pid>/environ`` shows it any more.
  :func:`known_secrets` lists every secret taken so far.
* :func:`mask_url` / :func:`mask_urls`: ``http://user:pw@host/v1`` -> ``http://user:***@host/v1``.
* :func:`redact_secrets`: each secret's value replaced by ``***``.
* :func:`relative_paths`: ``/srv/data/workspaces/c1/a.txt`` -> ``a.txt`` for the workspace
  ``/srv/data/workspaces/c1``: what a model or a client sees never names server paths.
* :func:`redact`: all of the above, with every known secret — for any error text that is
  about to be stored or returned (the run loop's ``_fail`` uses it).

Every function here is pure text work and never blocks; the safe is guarded by a lock, so
any thread may call any of them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import threading
from collections.abc import Iterable, MutableMapping
from pathlib import Path

__all__ = [
    "MASK",
    "known_secrets",
    "mask_url",
    "mask_urls",
    "redact",
    "redact_secrets",
    "relative_paths",
    "take_secret",
]

#: What a hidden value is replaced with.
MASK = "***"
#: Values shorter than this are never redacted from text: no API key is that short, and
#: replacing every "ab" in a message would make it unreadable, not safer.
MIN_SECRET_CHARS = 8

# scheme://netloc — the netloc is what may hold "user:password@".
_URL = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<netloc>[^\s/?#'\"<>]*)")
# What may follow a path in a message (the end of the path).
_PATH_END = r"""(?=$|[\s'"`:;,)\]}])"""

_safe_lock = threading.Lock()
_safe: dict[str, str] = {}


def take_secret(name: str, environ: MutableMapping[str, str] | None = None) -> str | None:
    """The value of the environment variable ``name``, moved into memory for good.

    The first call finds the variable, removes it from ``environ`` (``os.environ`` by
    default: then it is also wiped from the process's initial environment block, which is
    what ``/proc/<pid>/environ`` shows) and keeps the value for the process's life. A later
    call finds it gone and answers from memory, so every part of the server that needs the
    key gets it, however often the environment is read. A variable set again later wins.

    Returns None when the variable was never set (or was empty).
    """
    environ = os.environ if environ is None else environ
    with _safe_lock:
        if environ is os.environ and name in environ:
            _wipe_initial_environment(name)
        value = environ.pop(name, None)
        if value:
            _safe[name] = value
        return _safe.get(name)


def known_secrets() -> tuple[str, ...]:
    """Every secret :func:`take_secret` has taken so far (for :func:`redact_secrets`)."""
    with _safe_lock:
        return tuple(_safe.values())


def mask_url(url: str) -> str:
    """``url`` with its password, if it has one, replaced by ``***``."""
    return mask_urls(url)


def mask_urls(text: str) -> str:
    """Every URL in ``text`` with its password masked: ``http://user:***@host/…``."""
    return _URL.sub(_mask_match, text)


def redact_secrets(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with each secret's value replaced by ``***`` (longest first, so a secret
    that contains another is hidden whole; values shorter than 8 characters are left)."""
    for secret in sorted({s for s in secrets if s and len(s) >= MIN_SECRET_CHARS}, key=len)[::-1]:
        text = text.replace(secret, MASK)
    return text


def relative_paths(text: str, root: Path) -> str:
    """``text`` with the absolute path ``root`` left out: ``root/a/b`` becomes ``a/b`` and
    ``root`` itself ``.``. Both ``root`` as given and its resolved form (symlinks followed)
    are recognised; ``root`` must be absolute. A longer name that merely starts like
    ``root`` (``/ws/c1x`` for ``/ws/c1``) is left alone."""
    forms = {str(root).rstrip("/"), str(root.resolve()).rstrip("/")}
    for form in sorted(forms, key=len, reverse=True):
        if not form:
            continue  # "/" is no root to hide
        escaped = re.escape(form)
        text = re.sub(escaped + r"/+(?=[^\s/'\"`:;,)\]}])", "", text)
        text = re.sub(escaped + "/*" + _PATH_END, ".", text)
    return text


def redact(text: str, *, workspace: Path | None = None) -> str:
    """Error text made fit to store and show: every known secret hidden, passwords in URLs
    masked, and (given the run's ``workspace``) paths made relative to it."""
    text = mask_urls(redact_secrets(text, known_secrets()))
    return relative_paths(text, workspace) if workspace is not None else text


def _mask_match(match: re.Match[str]) -> str:
    userinfo, at, host = match["netloc"].rpartition("@")
    if not at or ":" not in userinfo:
        return match[0]
    user = userinfo.split(":", 1)[0]
    return f"{match['scheme']}{user}:{MASK}@{host}"


def _wipe_initial_environment(name: str) -> None:
    """Overwrite the value of ``name`` in the C ``environ`` strings with NUL bytes.

    Removing a variable (``unsetenv``) only drops the pointer to its ``NAME=value`` string;
    the string itself stays where the kernel put it at ``exec``, and
    ``/proc/<pid>/environ`` reads exactly that memory. Overwriting it in place is the only
    way to make the value disappear from there. Best effort: a platform without a C
    ``environ`` symbol is left as it is.
    """
    with contextlib.suppress(OSError, ValueError):
        environ = ctypes.POINTER(ctypes.c_void_p).in_dll(ctypes.CDLL(None), "environ")
        prefix = os.fsencode(name) + b"="
        index = 0
        while (address := environ[index]) is not None:
            entry = ctypes.string_at(address)
            if entry.startswith(prefix):
                ctypes.memset(address + len(prefix), 0, len(entry) - len(prefix))
            index += 1
