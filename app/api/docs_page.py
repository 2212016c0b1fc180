"""``GET /docs``: the API as a browsable page (Swagger UI), and ``GET /docs/<name>``: its files.

Everything is served from this server, nothing from a CDN: Swagger UI's script and style
sheet come from the ``swagger-ui-bundle-v2`` package (a runtime dependency shipping the
swagger-ui dist files), the page and its small start-up script from ``app/static/docs``
(package data). The start-up script points Swagger UI at ``/openapi.json``.

Serving reuses the dashboard's (``app/api/dashboard.py``): the files are read once at import
into an immutable table, only a name in it is served (anything else is a plain 404), every
answer has an ``ETag``, ``no-cache`` and ``nosniff``. The page gets the dashboard's
Content-Security-Policy, except that images may also be ``data:`` URLs (Swagger UI's style
sheet draws its icons with them); no inline script runs.

The views are plain functions with no state: nothing to cancel, nothing owned.
"""

from __future__ import annotations

import importlib.resources
from types import MappingProxyType

import swagger_ui_bundle
from quart import Blueprint, Response

from app.api.dashboard import PAGE_POLICY, Asset, load_assets, send_file_of, send_page
from app.api.openapi import documented

blueprint = Blueprint("docs", __name__)

PAGE = "docs.html"
#: The files of the swagger-ui dist that the page loads (not its demo page or source maps).
SWAGGER_UI_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")
DOCS_POLICY = PAGE_POLICY.replace("img-src 'self'", "img-src 'self' data:")


def _load() -> MappingProxyType[str, Asset]:
    own = load_assets(importlib.resources.files("app").joinpath("static", "docs"))
    swagger = load_assets(swagger_ui_bundle.swagger_ui_path, SWAGGER_UI_FILES)
    missing = set(SWAGGER_UI_FILES) - swagger.keys()
    if missing or PAGE not in own:
        raise RuntimeError(f"the /docs files are not installed: {sorted(missing) or [PAGE]}")
    return MappingProxyType({**swagger, **own})


ASSETS = _load()


@blueprint.get("/docs")
@documented("This API as a browsable page (Swagger UI, served offline).", media_type="text/html")
async def docs() -> Response:
    return send_page(ASSETS[PAGE], DOCS_POLICY)


@blueprint.get("/docs/<name>")
@documented("A file of the /docs page (script, style sheet, icon).", errors=(404,))
async def docs_file(name: str) -> Response:
    return send_file_of(ASSETS, name, page=PAGE, kind="docs")
