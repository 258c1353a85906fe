"""The web chat page at ``/`` (plain HTML/JS/CSS, served from ``gateway/static``).

No build step and nothing from a CDN: the three files are read once, when the app is built,
and served with ``Cache-Control: no-cache`` and an ETag, so a browser revalidates every load
and gets a 304 while the files are unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

#: Files the page is made of, with their content types. Nothing else is served from static/.
ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

#: The page talks to its own origin, and over WebSocket to the ``ws_url`` the gateway hands out
#: (which may name another host when ``public_url`` is set).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' http: https: ws: wss:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def load_assets() -> dict[str, Asset]:
    folder = resources.files("gateway").joinpath("static")
    assets = {}
    for name, content_type in ASSETS.items():
        body = folder.joinpath(name).read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        assets[name] = Asset(body, content_type, etag)
    return assets


def _serve(asset: Asset, request: web.Request) -> web.Response:
    headers = {
        "Cache-Control": "no-cache",
        "ETag": asset.etag,
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": CSP,
        "Referrer-Policy": "no-referrer",
    }
    if asset.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    headers["Content-Type"] = asset.content_type
    return web.Response(body=asset.body, headers=headers)


def add_routes(app: web.Application) -> None:
    assets = load_assets()

    async def index(request: web.Request) -> web.Response:
        return _serve(assets["index.html"], request)

    async def static(request: web.Request) -> web.Response:
        asset = assets.get(request.match_info["name"])
        if asset is None or request.match_info["name"] == "index.html":
            raise web.HTTPNotFound(text="not found\n")
        return _serve(asset, request)

    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
