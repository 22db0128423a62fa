"""`/<hash>.ls`: the NAR listing (version 1) with `narOffset`, as `nix` itself writes it."""

from __future__ import annotations

import json
import re

import trio

from ..context import Context
from ..nar import NarError, listing
from ..storepath import is_hash_part
from ..transport.messages import Request, Response, error, text


async def get_listing(ctx: Context, request: Request, match: re.Match[str]) -> Response:
    hash_part = match["hash"]
    if not is_hash_part(hash_part):
        return error(400, "a listing name is the 32-character hash of a store path")
    resolved = await ctx.resolve(hash_part, contents_only=True)
    if resolved is None:
        return error(404, "no such path")
    root = ctx.store.real_path(resolved.info.path)
    try:
        doc = await trio.to_thread.run_sync(listing, root)
    except NarError:
        return error(404, "no such path")
    return text(
        200,
        json.dumps(doc, separators=(",", ":")),
        "application/json",
        [("Cache-Control", "public, max-age=3600")],
    )
