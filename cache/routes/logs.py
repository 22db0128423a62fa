"""`/log/<drv>`: build logs from Nix's log directory, bzip2-decompressed unless the client takes bzip2.

An output path may be given instead of its derivation: its deriver's log is served.
"""

from __future__ import annotations

import bz2
import re
from pathlib import Path

import trio

from ..context import Context
from ..storepath import StorePath, StorePathError
from ..transport.messages import Request, Response, error

MAX_LOG = 256 * 1024 * 1024


def _read_log(log_dir: Path, base: str, decompress: bool) -> tuple[bytes, bool] | None:
    folder = log_dir / base[:2]
    plain = folder / base[2:]
    packed = folder / (base[2:] + ".bz2")
    # bounded reads: a build log can be many GB, and bzip2 shrinks repetitive text enormously
    if plain.is_file():
        with plain.open("rb") as f:
            return f.read(MAX_LOG), False
    if packed.is_file():
        with packed.open("rb") as f:
            data = f.read(MAX_LOG)
        if decompress:
            return bz2.BZ2Decompressor().decompress(data, max_length=MAX_LOG), False
        return data, True
    return None


async def get_log(ctx: Context, request: Request, match: re.Match[str]) -> Response:
    name = match["drv"]
    try:
        path = StorePath.parse_base_name(name, ctx.config.virtual_nix_store)
    except StorePathError:
        return error(400, "a log is asked for by a derivation's (or output's) store path base name")
    base = path.base_name
    if not base.endswith(".drv"):
        info = await ctx.store.info_from_hash_part(path.hash_part)
        if info is None or info.deriver is None:
            return error(404, "no build log for this path")
        base = info.deriver.rsplit("/", 1)[1]
    wants_bz2 = request.accepts_encoding("bzip2")
    try:
        found = await trio.to_thread.run_sync(_read_log, ctx.log_dir, base, not wants_bz2)
    except (OSError, ValueError, EOFError):
        return error(404, "the build log cannot be read")
    if found is None:
        return error(404, "no build log for this derivation")
    data, compressed = found
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Cache-Control", "public, max-age=3600"),
        ("Vary", "Accept-Encoding"),
    ]
    if compressed:
        headers.append(("Content-Encoding", "bzip2"))
    return Response(200, headers, data)
