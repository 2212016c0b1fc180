"""``GET /``: the live dashboard, and ``GET /static/<name>``: its files.

The dashboard is the static files in ``app/static`` (package data: the wheel ships them),
plain HTML, CSS and JavaScript modules with no build step and nothing loaded from elsewhere.
The page talks to the JSON API like any client, same-origin, and follows the server-wide
stream ``GET /api/events/stream`` with ``fetch()`` (``event_stream.js``: an ``EventSource``
cannot send the ``Authorization`` header that API keys need). The page and its files are
served without a key: with ``api_keys`` set, the page asks for one when the API answers 401
and keeps it in the tab's ``sessionStorage`` (``api_key.js``), never in a URL.

Serving:

* The files are read once, when this module is imported (at app creation, outside the event
  loop), into an immutable table: a request never touches the disk, and only a name in that
  table is served — a path with ``..`` or a slash, or any other name, is a plain 404.
* Every answer carries ``X-Content-Type-Options: nosniff`` and an ``ETag``; the client
  revalidates each time (``Cache-Control: no-cache``) and gets ``304`` while unchanged, so a
  new version of the server never meets a stale script.
* The page itself is sent with a Content-Security-Policy that allows only this origin
  (``default-src 'self'``): no inline script or style runs, nothing can be framed, no form
  posts elsewhere. The page never puts server text into HTML (it uses ``textContent``).

The views are plain functions with no state: nothing to cancel, nothing owned.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from types import MappingProxyType

from quart import Blueprint, Response, request

from app.api.openapi import documented
from app.errors import NotFound

blueprint = Blueprint("dashboard", __name__)

PAGE = "dashboard.html"
CONTENT_TYPES = MappingProxyType(
    {
        ".html": "text/html; charset=utf-8",
        ".js": "text/javascript; charset=utf-8",
        ".css": "text/css; charset=utf-8",
        ".png": "image/png",
        ".svg": "image/svg+xml",
    }
)
#: The page may load and connect to its own origin only; no plugins, no framing, no base
#: URL or form target elsewhere.
PAGE_POLICY = (
    "default-src 'self'; connect-src 'self'; img-src 'self'; object-src 'none';"
    " base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str  # unquoted


def load_assets(
    directory: Traversable | None = None, names: Collection[str] | None = None
) -> MappingProxyType[str, Asset]:
    """Every file of ``directory`` (default ``app/static``) with a known suffix, by file
    name (no subdirectories); with ``names``, only those (``/docs`` serves a few of a
    package's files this way)."""
    assets: dict[str, Asset] = {}
    directory = directory or importlib.resources.files("app").joinpath("static")
    for entry in directory.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        wanted = names is None or entry.name in names
        if wanted and entry.is_file() and suffix in CONTENT_TYPES and entry.name[:1] != ".":
            body = entry.read_bytes()
            etag = hashlib.sha256(body).hexdigest()[:32]
            assets[entry.name] = Asset(body, CONTENT_TYPES[suffix], etag)
    return MappingProxyType(assets)


ASSETS = load_assets()


@blueprint.get("/")
@documented("The live dashboard: an HTML page for browsers (not JSON).", media_type="text/html")
async def dashboard() -> Response:
    return send_page(ASSETS[PAGE], PAGE_POLICY)


@blueprint.get("/static/<name>")
@documented("A file of the dashboard (script, style sheet, image).", errors=(404,))
async def static_file(name: str) -> Response:
    return send_file_of(ASSETS, name, page=PAGE, kind="static")


def send_page(page: Asset, policy: str) -> Response:
    """An HTML page with its Content-Security-Policy; links from it send no ``Referer``."""
    response = send_asset(page)
    response.headers["Content-Security-Policy"] = policy
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def send_file_of(assets: Mapping[str, Asset], name: str, *, page: str, kind: str) -> Response:
    """The file ``name`` of ``assets``, or 404 — also for ``page``, which is served at its
    own route only, with its policy.

    Errors:
        :class:`NotFound`: no such file (the name is quoted, cut at 100 characters).
    """
    asset = assets.get(name) if name != page else None
    if asset is None:
        raise NotFound(f"there is no {kind} file {name[:100]!r}", detail={"name": name[:100]})
    return send_asset(asset)


def send_asset(asset: Asset) -> Response:
    """``asset``, or ``304 Not Modified`` when the client holds this version already."""
    headers = {
        "ETag": f'"{asset.etag}"',
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
    }
    if request.if_none_match.contains(asset.etag):
        return Response(b"", status=304, headers=headers)
    return Response(asset.body, headers=headers, content_type=asset.content_type)
