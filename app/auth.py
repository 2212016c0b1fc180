"""API keys: who may call the API, and as which tenant (see :mod:`app.principal`).

Without keys (``api_keys`` empty and no ``api_keys_file``) the server is in the open mode:
every request acts as :data:`~app.principal.OPEN_PRINCIPAL`, and the command line allows
only loopback binds. With keys:

* every ``/api`` route, stream and WebSocket needs ``Authorization: Bearer <key>``; a
  WebSocket may instead send ``{"type": "auth", "key": "..."}`` as its first frame (within
  :data:`AUTH_FRAME_SECONDS`), because browsers cannot set headers on a WebSocket;
* ``/health``, ``/ready``, the dashboard (``/``, ``/static/*``), ``/openapi.json`` and
  ``/docs`` stay open; ``/metrics`` is open unless ``metrics_require_key`` is set;
* a missing or unknown key is 401 ``unauthorized`` with ``WWW-Authenticate: Bearer`` (a
  WebSocket that authenticates by frame is closed with 4401 instead).

A key is compared as its SHA-256 digest with :func:`hmac.compare_digest`, against every
configured digest (no early exit), so ``key_sha256`` entries work and the time taken tells
nothing about which bytes matched. The key itself is never logged, stored or echoed: logs
name a :attr:`~app.principal.Principal.key_id` (the tenant and the first 8 hex characters of
the key's digest).

The hooks run after the Host and Origin guards (``app/api/guards.py``), in the same
``before_request`` / ``before_websocket`` chain, so a refused request reaches no handler.
The key table is read once, when the app is built: keys change at restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from pydantic import TypeAdapter, ValidationError
from quart import Quart, current_app, g, request, websocket
from quart.wrappers.base import BaseRequestWebsocket

from app.errors import Forbidden, Unauthorized
from app.logs import log_fields
from app.principal import OPEN_PRINCIPAL, Principal
from app.settings import ApiKeySetting, Settings, check_distinct_keys
from app.settings_sources import SettingsError

log = logging.getLogger("trellis.auth")

#: How long a WebSocket without an ``Authorization`` header has to send its auth frame.
AUTH_FRAME_SECONDS = 10.0
MAX_AUTH_FRAME_CHARS = 4096
_EXTENSION = "trellis.keys"
_ENTRIES: TypeAdapter[list[ApiKeySetting]] = TypeAdapter(list[ApiKeySetting])


@dataclass(frozen=True)
class KeyTable:
    """The configured keys, as (digest, principal) pairs; empty in the open mode."""

    entries: tuple[tuple[bytes, Principal], ...] = ()

    @classmethod
    def of(cls, keys: Iterable[ApiKeySetting]) -> KeyTable:
        entries = []
        for entry in keys:
            digest = entry.digest()
            key_id = f"{entry.tenant}:{digest.hex()[:8]}"
            entries.append((digest, Principal(entry.tenant, entry.admin, key_id)))
        return cls(tuple(entries))

    def __bool__(self) -> bool:
        return bool(self.entries)

    def lookup(self, key: str) -> Principal | None:
        """The principal of ``key``, or ``None``; compares against every entry."""
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found = None
        for known, principal in self.entries:
            if hmac.compare_digest(known, digest):
                found = principal
        return found


def load_api_keys(settings: Settings) -> KeyTable:
    """``api_keys`` and the entries of ``api_keys_file``, checked together for duplicates.

    Errors:
        :class:`SettingsError` naming the file and the entry's position and field (never a
        key) for an unreadable file, a bad entry or a key given twice.
    """
    keys = list(settings.api_keys)
    if settings.api_keys_file:
        keys += read_keys_file(Path(settings.api_keys_file))
    try:
        check_distinct_keys(keys)
    except ValueError as exc:
        where = f"api_keys_file {settings.api_keys_file}" if settings.api_keys_file else ""
        sources = f"api_keys + {where}" if where else "api_keys"
        raise SettingsError(f"{sources} (entries counted in that order): {exc}") from None
    return KeyTable.of(keys)


def read_keys_file(path: Path) -> list[ApiKeySetting]:
    """The entries of a keys file: JSON (``.json``: an array, or ``{"api_keys": [...]}``)
    or TOML (``api_keys = [...]`` or ``[[api_keys]]`` tables).

    Errors:
        :class:`SettingsError`, naming the file; never a value from it.
    """
    where = f"api_keys_file {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise SettingsError(f"cannot read {where}: {reason}") from None
    try:
        document: Any = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except ValueError:  # JSONDecodeError, TOMLDecodeError: their text may quote a key
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise SettingsError(f"{where} is not valid {kind}") from None
    entries = document.get("api_keys") if isinstance(document, dict) else document
    try:
        return _ENTRIES.validate_python(entries)
    except ValidationError as exc:
        lines = [
            f"{where}: {'.'.join(str(part) for part in error['loc']) or 'api_keys'}: {error['msg']}"
            for error in exc.errors()
        ]
        raise SettingsError("; ".join(lines)) from None


def install_auth(app: Quart, settings: Settings) -> KeyTable:
    """Load the keys and, if there are any, require one on every keyed path of ``app``.

    Install after the guards (their hooks must run first). Returns the key table.

    Errors:
        :class:`SettingsError` from :func:`load_api_keys`.
    """
    table = load_api_keys(settings)
    app.extensions[_EXTENSION] = table
    if not table:
        return table

    def keyed(path: str) -> bool:
        if path == "/metrics":
            return settings.metrics_require_key
        return path == "/api" or path.startswith("/api/")

    @app.before_request
    async def require_key() -> None:
        if keyed(request.path):
            _authenticate(table, _bearer(request))

    @app.before_websocket
    async def require_websocket_key() -> None:
        if not keyed(websocket.path):
            return
        if "Authorization" in websocket.headers:
            _authenticate(table, _bearer(websocket))  # refused before the handshake: 401
        else:
            g.trellis_auth_pending = True  # the handler reads the auth frame

    return table


async def authenticate_websocket() -> None:
    """For a WebSocket handler, first thing: when the handshake carried no key, accept
    the socket and read the first frame, which must be ``{"type": "auth", "key": "..."}``.

    Cancellation: waits at most :data:`AUTH_FRAME_SECONDS` for the frame; a client gone
    cancels it like any receive.

    Errors:
        :class:`Unauthorized` when the frame is late, malformed or names an unknown key
        (the socket is accepted by then: the caller reports it with a close code, 4401).
    """
    if not g.get("trellis_auth_pending"):
        return
    await websocket.accept()
    message: str | bytes | None = None
    with trio.move_on_after(AUTH_FRAME_SECONDS):
        message = await websocket.receive()
    key = _frame_key(message)
    g.trellis_auth_pending = False
    _authenticate(current_app.extensions[_EXTENSION], key)


def current_principal() -> Principal:
    """The principal of the request (or WebSocket) being handled.

    Errors:
        :class:`Unauthorized` when keys are configured and this request presented none (a
        route outside the keyed paths, or a WebSocket that has not authenticated yet).
    """
    principal: Principal | None = g.get("trellis_principal")
    if principal is not None:
        return principal
    if current_app.extensions.get(_EXTENSION):
        raise Unauthorized("an API key is required: send Authorization: Bearer <key>")
    return OPEN_PRINCIPAL


def require_admin() -> Principal:
    """The principal, if it is an admin. Errors: :class:`Forbidden` (403) otherwise."""
    principal = current_principal()
    if not principal.admin:
        raise Forbidden("this needs an admin API key")
    return principal


def _bearer(incoming: BaseRequestWebsocket) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header (one header, scheme in any
    case); ``None`` when there is none or it is malformed."""
    values = incoming.headers.getlist("Authorization")
    if len(values) != 1:
        return None
    scheme, _, key = values[0].strip().partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


def _frame_key(message: str | bytes | None) -> str | None:
    if message is None or len(message) > MAX_AUTH_FRAME_CHARS:
        return None
    try:
        frame = json.loads(message)
    except ValueError:
        return None
    if not isinstance(frame, dict) or frame.get("type") != "auth":
        return None
    key = frame.get("key")
    return key if isinstance(key, str) and key else None


def _authenticate(table: KeyTable, key: str | None) -> None:
    """Set the request's principal from ``key``. Errors: :class:`Unauthorized`."""
    principal = table.lookup(key) if key is not None else None
    if principal is None:
        reason = "no API key" if key is None else "an unknown API key"
        log_fields(log, "refused a request with {reason}", reason=reason)
        raise Unauthorized(
            "a valid API key is required: send Authorization: Bearer <key>"
            if key is None
            else "the API key is not valid",
        )
    g.trellis_principal = principal
    g.trellis_key_id = principal.key_id
