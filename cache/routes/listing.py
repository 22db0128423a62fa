"""`/<hash>.ls`: the NAR listing (version 1) with `narOffset`, as `nix` itself writes it."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

import trio

from ..http import Request, Response, error, text
from ..nar import NarError, listing
from ..storepath import is_hash_part

if TYPE_CHECKING:
    from ..app import App


async def get_listing(app: App, request: Request, match: re.Match[str]) -> Response:
    hash_part = match["hash"]
    if not is_hash_part(hash_part):
        return error(400, "a listing name is the 32-character hash of a store path")
    resolved = await app.resolve(hash_part)
    if resolved is None:
        return error(404, "no such path")
    root = app.store.real_path(resolved.info.path)
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
