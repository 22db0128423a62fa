"""`/serve/<hash>/<path>`: browse a store path: files, `index.html`, directory listings.

Never leaves the store path: `..` is refused, and symlinks are resolved by hand inside the
path's own tree. A link into another store path redirects to that path's own `/serve/` URL;
a link anywhere else is a 404.
"""

from __future__ import annotations

import html
import mimetypes
import os
import re
import stat
from dataclasses import dataclass
from urllib.parse import quote

import trio

from ..context import Context
from ..nar import FileRegion
from ..storepath import is_hash_part
from ..transport.messages import Request, Response, error
from .ranged import ranged, segment_slices

MAX_LINKS = 40


@dataclass(frozen=True, slots=True)
class Found:
    parts: tuple[bytes, ...]  # components inside the store path, links resolved
    st: os.stat_result


@dataclass(frozen=True, slots=True)
class Elsewhere:
    target: bytes  # an absolute path a link pointed to


def resolve_inside(root: bytes, parts: list[bytes], store_dir: bytes) -> Found | Elsewhere | None:
    """Walk `parts` under `root`, following links only while they stay under `root`.

    Nothing is ever followed by the kernel: every component, the store path itself included,
    is looked at with lstat, so a store path that *is* a link (to /etc, say) is a link to
    resolve, not a directory to read.
    """
    try:
        top = os.lstat(root)
    except OSError:
        return None
    rest = b"".join(b"/" + p for p in parts)
    if stat.S_ISLNK(top.st_mode):
        target = os.readlink(root)
        if not target.startswith(b"/"):
            target = store_dir + b"/" + target  # relative to the store directory
        return Elsewhere(os.path.normpath(target) + rest)
    done: list[bytes] = []
    todo = list(parts)
    links = 0
    while True:
        if not todo:
            try:
                st = os.lstat(root + b"".join(b"/" + p for p in done)) if done else top
            except OSError:
                return None
            return Found(tuple(done), st)
        part = todo.pop(0)
        if part in (b"", b"."):
            continue
        if part == b"..":
            if not done:
                return None
            done.pop()
            continue
        here = root + b"".join(b"/" + p for p in (*done, part))
        try:
            st = os.lstat(here)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_LINKS:
                return None
            target = os.readlink(here)
            if target.startswith(b"/"):
                return Elsewhere(os.path.normpath(target) + b"".join(b"/" + p for p in todo))
            todo = target.split(b"/") + todo
            continue
        if todo and not stat.S_ISDIR(st.st_mode):
            return None
        done.append(part)


def _shown(name: bytes) -> str:
    """A file name for people: UTF-8 where it is, escapes where it is not."""
    return name.decode("utf-8", "backslashreplace")


def _listing_page(title: str, base_url: str, entries: list[tuple[bytes, bool]]) -> bytes:
    esc = html.escape
    items = "".join(
        f'<li><a href="{esc(base_url + quote(name) + ("/" if is_dir else ""))}">'
        f"{esc(_shown(name))}{'/' if is_dir else ''}</a></li>"
        for name, is_dir in entries
    )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title></head>'
        f"<body><h1>{esc(title)}</h1><ul>{items}</ul></body></html>\n"
    ).encode()


async def get_serve(ctx: Context, request: Request, match: re.Match[str]) -> Response:
    hash_part = match["hash"]
    if not is_hash_part(hash_part):
        return error(400, "/serve/ takes the 32-character hash of a store path")
    raw = request.path_bytes
    prefix = f"/serve/{hash_part}".encode()
    rest = raw[len(prefix) :]
    if b"\0" in rest:
        return error(400, "invalid path")
    parts = [p for p in rest.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        return error(400, "'..' is not allowed in /serve/ paths")
    resolved = await ctx.resolve(hash_part, contents_only=True)
    if resolved is None:
        return error(404, "no such path")
    store_path = resolved.info.path
    root = ctx.store.real_path(store_path)
    store_dir = os.fsencode(ctx.config.virtual_nix_store)
    found = await trio.to_thread.run_sync(resolve_inside, root, parts, store_dir)
    if isinstance(found, Elsewhere):
        store_prefix = os.fsencode(ctx.config.virtual_nix_store) + b"/"
        if found.target.startswith(store_prefix):
            inner = found.target[len(store_prefix) :]
            base, _, tail = inner.partition(b"/")
            other = base[:32].decode("ascii", "replace")
            if is_hash_part(other):
                location = f"/serve/{other}/" + quote(tail)
                return Response(302, [("Location", location), ("Cache-Control", "no-store")], b"")
        return error(404, "this link leads outside the store path")
    if found is None:
        return error(404, "no such file in this store path")
    url_base = f"/serve/{hash_part}/" + "".join(quote(p) + "/" for p in found.parts)
    target = root + b"".join(b"/" + p for p in found.parts)
    st = found.st
    if stat.S_ISDIR(st.st_mode):
        if not raw.endswith(b"/"):
            return Response(301, [("Location", quote(raw) + "/")], b"")
        index = await trio.to_thread.run_sync(resolve_inside, root, [*found.parts, b"index.html"], store_dir)
        if isinstance(index, Found) and stat.S_ISREG(index.st.st_mode):
            return _file(
                request, root + b"".join(b"/" + p for p in index.parts), index.st.st_size, "index.html"
            )
        names = sorted(os.listdir(target))
        entries = []
        for name in names:
            try:
                is_dir = stat.S_ISDIR(os.stat(target + b"/" + name).st_mode)
            except OSError:
                is_dir = False
            entries.append((name, is_dir))
        title = store_path + "/" + "/".join(_shown(p) for p in found.parts)
        return Response(
            200, [("Content-Type", "text/html; charset=utf-8")], _listing_page(title, url_base, entries)
        )
    if not stat.S_ISREG(st.st_mode):
        return error(404, "not a regular file")
    return _file(request, target, st.st_size, _shown(found.parts[-1]) if found.parts else "")


def _file(request: Request, path: bytes, size: int, name: str) -> Response:
    ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if ctype.startswith("text/"):
        ctype += "; charset=utf-8"
    headers = [
        ("Content-Type", ctype),
        ("Accept-Ranges", "bytes"),
        ("Cache-Control", "public, max-age=3600"),
        ("X-Content-Type-Options", "nosniff"),
    ]
    region = FileRegion(path, size)
    return ranged(request, headers, size, segment_slices(lambda: iter([region]), size))
