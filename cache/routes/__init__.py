"""Every route of the cache, in one table. Each answers GET and HEAD; HEAD sends GET's headers.

| path                                   | module    | what                                   |
|----------------------------------------|-----------|----------------------------------------|
| /                                      | info      | landing page: keys and client settings |
| /nix-cache-info                        | info      | StoreDir, WantMassQuery, Priority      |
| /version, /health, /metrics            | info      | service endpoints                      |
| /<hash>.narinfo[?json]                 | narinfo   | signed path metadata                   |
| /<hash>.ls                             | listing   | NAR listing with narOffset             |
| /nar/<narhash>.nar?hash=<hash>         | nar       | the NAR (Range, zstd content coding)   |
| /nar/<narhash>.nar.zst?hash=<hash>     | nar       | the NAR's compressed copy              |
| /nar/<hash>-<narhash>.nar              | nar       | nix-serve's legacy form                |
| /log/<drv>                             | logs      | build logs                             |
| /serve/<hash>/<path>                   | serve     | browse a store path                    |
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from ..context import Context
from ..transport.messages import Request, Response, error
from . import info, listing, logs, nar, narinfo, serve

Handler = Callable[[Context, Request, "re.Match[str]"], Awaitable[Response]]

# (pattern, route name for metrics, handler). First match wins.
ROUTES: list[tuple[re.Pattern[str], str, Handler]] = [
    (re.compile(r"/"), "landing", info.landing),
    (re.compile(r"/nix-cache-info"), "nix-cache-info", info.nix_cache_info),
    (re.compile(r"/version"), "version", info.version),
    (re.compile(r"/health"), "health", info.health),
    (re.compile(r"/metrics"), "metrics", info.metrics),
    (re.compile(r"/(?P<hash>[^/]*)\.narinfo"), "narinfo", narinfo.get_narinfo),
    (re.compile(r"/(?P<hash>[^/]*)\.ls"), "ls", listing.get_listing),
    (re.compile(r"/nar/(?P<narhash>[^/-]*)\.nar"), "nar", nar.get_nar),
    (re.compile(r"/nar/(?P<narhash>[^/-]*)\.nar\.zst"), "nar", nar.get_nar_zst),
    (re.compile(r"/nar/(?P<hash>[^/]*)-(?P<narhash>[^/]*)\.nar"), "nar", nar.get_nar_legacy),
    (re.compile(r"/log/(?P<drv>[^/]+)"), "log", logs.get_log),
    (re.compile(r"/serve/(?P<hash>[^/]+)(?P<rest>/.*)?"), "serve", serve.get_serve),
]

ALLOWED = "GET, HEAD"


async def dispatch(ctx: Context, request: Request) -> Response:
    path = request.raw_path
    for pattern, route, handler in ROUTES:
        match = pattern.fullmatch(path)
        if match is None:
            continue
        if request.method not in ("GET", "HEAD"):
            if request.method == "PUT":
                resp = error(
                    405,
                    "this binary cache is read-only: it serves the Nix store of its "
                    "host; copy paths into that store instead (nix copy --to ssh-ng://…)",
                    [("Allow", ALLOWED)],
                )
            else:
                resp = error(405, f"method {request.method} not allowed", [("Allow", ALLOWED)])
        else:
            resp = await handler(ctx, request, match)
        resp.route = route
        return resp
    if request.method == "PUT":
        resp = error(405, "this binary cache is read-only", [("Allow", ALLOWED)])
    else:
        resp = error(404, "not found")
    return resp
