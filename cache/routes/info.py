"""Service routes: the landing page, nix-cache-info, version, health and metrics."""

from __future__ import annotations

import html
import re

from ..context import Context
from ..narinfo import cache_info
from ..transport.messages import Request, Response, error, text

_HOST = re.compile(r"[A-Za-z0-9.\-:\[\]]{1,255}")


async def nix_cache_info(ctx: Context, request: Request, match: re.Match[str]) -> Response:
    body = cache_info(ctx.config.virtual_nix_store, ctx.config.priority)
    return text(200, body, "text/x-nix-cache-info", [("Cache-Control", "public, max-age=300")])


async def version(ctx: Context, request: Request, match: re.Match[str]) -> Response:
    return text(200, f"harmonia-cache {ctx.version}\n")


async def health(ctx: Context, request: Request, match: re.Match[str]) -> Response:
    # a store query proves the database (or daemon) answers, not just that the process runs
    await ctx.store.path_from_hash_part("0" * 32)
    return text(200, "OK\n", extra=[("Cache-Control", "no-store")])


async def metrics(ctx: Context, request: Request, match: re.Match[str]) -> Response:
    return text(
        200, ctx.metrics.render(), "text/plain; version=0.0.4; charset=utf-8", [("Cache-Control", "no-store")]
    )


async def landing(ctx: Context, request: Request, match: re.Match[str]) -> Response:
    host = request.header("host") or "127.0.0.1:5000"
    if not _HOST.fullmatch(host):
        return error(400, "invalid Host header")
    url = f"http://{host}"
    keys = " ".join(str(k) for k in ctx.public_keys)
    esc = html.escape
    rows = "".join(f"<li><code>{esc(str(k))}</code></li>" for k in ctx.public_keys) or "<li>(unsigned)</li>"
    nixos = (
        "nix.settings = {\n"
        f'  substituters = [ "{url}" ];\n'
        f"  trusted-public-keys = [ {' '.join(chr(34) + str(k) + chr(34) for k in ctx.public_keys)} ];\n"
        "};"
    )
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>harmonia-cache</title>
<style>body{{font-family:sans-serif;max-width:50em;margin:2em auto;padding:0 1em}}
pre{{background:#f4f4f4;padding:1em;overflow:auto}}</style></head>
<body><h1>Nix binary cache</h1>
<p>This server ({esc(ctx.version)}) serves the Nix store <code>{esc(ctx.config.virtual_nix_store)}</code>
with priority {ctx.config.priority}.</p>
<h2>Public keys</h2><ul>{rows}</ul>
<h2>Use it</h2><p>In <code>/etc/nix/nix.conf</code>:</p>
<pre>extra-substituters = {esc(url)}
extra-trusted-public-keys = {esc(keys)}</pre>
<p>On NixOS:</p><pre>{esc(nixos)}</pre>
</body></html>
"""
    return text(200, body, "text/html; charset=utf-8", [("Cache-Control", "no-store")])
