"""`/<hash>.narinfo` (and `?json`): the signed metadata of one store path."""

from __future__ import annotations

import re

from ..context import Context
from ..storepath import is_hash_part
from ..transport.messages import Request, Response, error, text

POSITIVE_CACHE = "public, max-age=3600"


async def get_narinfo(ctx: Context, request: Request, match: re.Match[str]) -> Response:
    hash_part = match["hash"]
    if not is_hash_part(hash_part):
        return error(400, "a narinfo name is the 32-character hash of a store path")
    resolved = await ctx.resolve(hash_part)
    if resolved is None:
        return error(404, "no such path")
    narinfo = ctx.narinfo(resolved)
    if request.query and "json" in request.query_params():
        return text(200, narinfo.to_json(), "application/json", [("Cache-Control", POSITIVE_CACHE)])
    return text(200, narinfo.render(), "text/x-nix-narinfo", [("Cache-Control", POSITIVE_CACHE)])
