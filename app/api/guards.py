"""Who may talk to the API: three checks on every request, before any handler runs.

Trellis runs commands for whoever talks to it, and it usually listens on the user's own
machine — where every web page the user opens is a potential caller. Browsers limit what a
page may do to another site, and these checks stand on those limits:

1. **Host** (421 ``misdirected_request``): the ``Host`` header must name the bound address,
   a loopback name (``localhost``, ``127.0.0.1``, ``[::1]``; any port) or an
   ``allowed_hosts`` entry. DNS rebinding — a page's own domain re-pointed at 127.0.0.1,
   which makes the browser treat this server as same-origin and read its answers — always
   carries the page's domain here. ``/health`` answers any Host: it tells nothing but
   "alive", and probes often address a machine by a name of their own.
2. **Origin** (403 ``forbidden_origin``): browsers add ``Origin`` to cross-site requests
   (and to same-origin ones that change state); a request carrying one that is not in
   ``allowed_origins`` is refused. Non-browser clients send none.
3. **Media type** (415 ``unsupported_media_type``): a POST, PUT, PATCH or DELETE that has a
   body, or names a ``Content-Type``, must be ``application/json`` or ``application/*+json``,
   UTF-8. A page may send ``text/plain``, a form or multipart data to any site without
   asking first ("simple" requests); JSON it may not.

The checks run in this order, in a ``before_request`` hook, so a refused request reaches
no handler: nothing is read from its body, nothing is stored, nothing runs. WebSocket
handshakes pass the same Host and Origin checks in a ``before_websocket`` hook and are
refused with the same HTTP answer *before* the connection is accepted: browsers send
``Origin`` with every WebSocket handshake and do not apply the same-origin policy to
WebSockets, so this check is what stops a page of another site from opening one
(cross-site WebSocket hijacking).

CORS: ``allowed_origins`` is also the CORS allow-list (none by default). An answer to a
request from an allowed origin carries ``Access-Control-Allow-Origin: <that origin>`` and
``Vary: Origin``; a preflight (``OPTIONS`` with ``Access-Control-Request-Method``) from one is
answered here with 204 and the methods, the request headers a client may send
(``Authorization``, ``Content-Type``, ``Idempotency-Key``, ``Last-Event-ID``) and a max age —
before the API key check, since browsers send no credentials with a preflight. A preflight
from any other origin is refused by the Origin check (403). No credentials mode
(``Access-Control-Allow-Credentials``): clients send their key as a header.

Wildcard binds: with ``host`` ``0.0.0.0`` or ``::`` (a container), API keys and no
``allowed_hosts``, any ``Host`` is accepted — the server cannot know the names it is reached
by, and every ``/api`` route needs a key, which a rebinding page does not have. Set
``allowed_hosts`` to check Host names anyway.

Errors:
    :class:`~app.errors.MisdirectedRequest`, :class:`~app.errors.ForbiddenOrigin`,
    :class:`~app.errors.UnsupportedMediaType`.
"""

from __future__ import annotations

import re

from quart import Quart, Response, request, websocket
from quart.wrappers.base import BaseRequestWebsocket

from app.errors import ForbiddenOrigin, MisdirectedRequest, UnsupportedMediaType
from app.settings import Settings

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
OPEN_TO_ANY_HOST = frozenset({"/health"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})
CORS_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"
CORS_REQUEST_HEADERS = "Authorization, Content-Type, Idempotency-Key, Last-Event-ID"
CORS_EXPOSED_HEADERS = "Location, Retry-After, WWW-Authenticate, Idempotent-Replayed"
CORS_MAX_AGE_SECONDS = 600

# host [":" port], host being a name, an IPv4 address or a bracketed IPv6 address.
_HOST_HEADER = re.compile(
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::[0-9]{1,5})?"
)
_SHOWN_CHARS = 200  # of a refused header, in the error message


def install_guards(app: Quart, settings: Settings) -> None:
    """Check Host, Origin and the media type of every request to ``app`` (in that order),
    and Host and Origin of every WebSocket handshake."""
    hosts = LOOPBACK_NAMES | {_bare(settings.host)} | {_bare(h) for h in settings.allowed_hosts}
    origins = frozenset(_normal_origin(origin) for origin in settings.allowed_origins)
    wildcard = _bare(settings.host) in WILDCARD_HOSTS and not settings.allowed_hosts

    def any_host() -> bool:  # the keys are loaded when the app is built (app/auth.py)
        return wildcard and bool(app.extensions.get("trellis.keys"))

    @app.before_request
    async def guard_request() -> Response | None:
        if not any_host():
            check_host(hosts, request)
        check_origin(origins, request)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return _preflight(origins)
        if request.method in BODY_METHODS and _declares_body():
            check_json_media_type()
        return None

    @app.before_websocket
    async def guard_websocket() -> None:
        if not any_host():
            check_host(hosts, websocket)
        check_origin(origins, websocket)

    @app.after_request
    async def allow_origin(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin is not None and _normal_origin(origin) in origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED_HEADERS
        if origins:
            response.vary.add("Origin")
        return response


def _preflight(origins: frozenset[str]) -> Response | None:
    """The answer to a CORS preflight from an allowed origin (204); ``None`` for one from
    this server's own origin (not a cross-origin request: the route answers OPTIONS).
    Another origin never gets here (:func:`check_origin` refused it)."""
    origin = request.headers.get("Origin")
    if origin is None or _normal_origin(origin) not in origins:
        return None
    headers = {
        "Access-Control-Allow-Methods": CORS_METHODS,
        "Access-Control-Allow-Headers": CORS_REQUEST_HEADERS,
        "Access-Control-Max-Age": str(CORS_MAX_AGE_SECONDS),
    }
    return Response(b"", status=204, headers=headers)


def check_host(allowed: frozenset[str], incoming: BaseRequestWebsocket) -> None:
    """Refuse a request (or handshake) whose Host is not one of ``allowed`` nor the address
    it reached.

    The address the connection reached (the ASGI ``server``) is always accepted: with a
    wildcard bind (``0.0.0.0``) it is the machine's own address that the client dialled.
    """
    if incoming.path in OPEN_TO_ANY_HOST:
        return
    headers = incoming.headers.getlist("Host")
    name = host_name(headers[0]) if len(headers) == 1 else None
    server = incoming.scope.get("server")
    reached = _bare(str(server[0])) if server else None
    if name is None or (name not in allowed and name != reached):
        shown = ", ".join(headers)[:_SHOWN_CHARS]
        raise MisdirectedRequest(
            f"this server does not answer for Host {shown!r}; use 127.0.0.1 or localhost, or"
            " add the name to allowed_hosts",
            detail={"host": shown},
        )


def host_name(header: str) -> str | None:
    """The host of a ``Host`` header value, lowercased, without port, brackets or a final
    dot; ``None`` when the value is not a host."""
    match = _HOST_HEADER.fullmatch(header)
    if match is None:
        return None
    name = (match["ipv6"] or match["name"]).lower()
    return name[:-1] if name.endswith(".") else name


def check_origin(allowed: frozenset[str], incoming: BaseRequestWebsocket) -> None:
    """Refuse a request (or handshake) carrying an ``Origin`` that is neither in ``allowed``
    nor this server's own origin: the scheme and the ``Host`` it was reached at (checked
    by :func:`check_host` first), which is what a page this server served (the dashboard
    at ``/``) sends with its POST, PATCH and DELETE calls. A page of any other site, or of
    another port on this machine, sends an origin of its own and is refused."""
    own = _own_origin(incoming)
    for origin in incoming.headers.getlist("Origin"):
        normal = _normal_origin(origin)
        if normal != own and normal not in allowed:
            shown = origin[:_SHOWN_CHARS]
            raise ForbiddenOrigin(
                f"requests from web pages of origin {shown!r} are not allowed; a page may"
                " call this API only if its origin is in allowed_origins",
                detail={"origin": shown},
            )


def check_json_media_type() -> None:
    """Refuse a body not declared as UTF-8 JSON (``application/json`` or ``+json``)."""
    mimetype = request.mimetype
    charset = request.mimetype_params.get("charset")
    is_json = mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    )
    if not is_json or (charset is not None and charset.lower() != "utf-8"):
        declared = request.headers.get("Content-Type", "")[:_SHOWN_CHARS]
        got = repr(declared) if declared else "no Content-Type"
        raise UnsupportedMediaType(
            "the request body must be JSON in UTF-8, sent with Content-Type:"
            f" application/json; got {got}",
            detail={"content_type": declared or None},
        )


def _declares_body() -> bool:
    """Whether the request names a content type or announces body bytes."""
    return (
        "Content-Type" in request.headers
        or (request.content_length or 0) > 0
        or "Transfer-Encoding" in request.headers
    )


def _own_origin(incoming: BaseRequestWebsocket) -> str | None:
    """``scheme://host[:port]`` of this server as the request reached it (``ws`` counts as
    ``http``); ``None`` where the Host is not checked or not a single header."""
    hosts = incoming.headers.getlist("Host")
    if incoming.path in OPEN_TO_ANY_HOST or len(hosts) != 1:
        return None
    scheme = {"ws": "http", "wss": "https"}.get(incoming.scheme, incoming.scheme)
    return _normal_origin(f"{scheme}://{hosts[0]}")


def _bare(host: str) -> str:
    return host.strip("[]").lower()


def _normal_origin(origin: str) -> str:
    return origin.strip().lower().rstrip("/")
