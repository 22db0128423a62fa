"""`/<hash>.narinfo` (and `?json`): the signed metadata of one store path."""

from __future__ import annotations

import re

from ..context import Context
from ..storepath import is_hash_part
from ..transport.messages import Request, Response, error

POSITIVE_CACHE = "public, max-age=3600"
_CACHE = ("Cache-Control", POSITIVE_CACHE)
_NARINFO_TYPE = ("Content-Type", "text/x-nix-narinfo")


async def get_narinfo(ctx: Context, request: Request, match: re.Match[str]) -> Response:
    hash_part = match["hash"]
    if not is_hash_part(hash_part):
        return error(400, "a narinfo name is the 32-character hash of a store path")
    known = await ctx.known(hash_part)
    if known is None:
        return error(404, "no such path")
    if request.query and "json" in request.query_params():
        body = ctx.narinfo_body(known, as_json=True)
        return Response(200, [("Content-Type", "application/json"), _CACHE], body)
    return Response(200, [_NARINFO_TYPE, _CACHE], ctx.narinfo_body(known, as_json=False))
