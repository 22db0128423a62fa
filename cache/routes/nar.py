"""NAR routes: `/nar/<narhash>.nar?hash=<hash>`, the `.nar.zst` copy, and nix-serve's legacy form.

Everything is checked before the status line goes out: the path is valid, on disk, and its NAR
hash is the one in the URL (a path rebuilt or collected since the narinfo gives 404, never the
wrong bytes). Identity bodies always carry Content-Length, so a transfer cut by a failure is
seen as incomplete by the client.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Callable, Iterator

import trio

from ..compression import (
    MIN_COMPRESS_SIZE,
    SMALL_NAR,
    CompressedNar,
    LiveCopy,
    compress_chunks,
    compressed_in_memory,
    has_copy,
    iter_nar_bytes,
    nar_in_memory,
)
from ..context import Context, Resolved
from ..daemon import DaemonError
from ..hashes import nix32_encode
from ..nar import FileRegion, Segment, read_small_file
from ..narinfo import PathInfo
from ..store import FsNar, StreamedNar
from ..storepath import is_hash_part
from ..transport.messages import Body, Request, Response, StreamBody, error
from .ranged import ranged, segment_slices, select_range

NAR_TYPE = "application/x-nix-nar"
IMMUTABLE = "public, max-age=31536000, immutable"
DAEMON_FIRST_BYTE_TIMEOUT = 30.0
INLINE_MAX = SMALL_NAR  # bodies up to this size are read (and compressed) whole on the event loop
_NIX32_SHA256 = re.compile(r"[0123456789abcdfghijklmnpqrsvwxyz]{52}")


async def _lookup(ctx: Context, hash_part: str | None, narhash: str) -> Resolved | Response:
    if not _NIX32_SHA256.fullmatch(narhash):
        return error(400, "a NAR name is the nix32 sha256 of the NAR")
    if hash_part is None:
        return error(400, "missing ?hash=<store path hash> (take the URL from the narinfo)")
    if not is_hash_part(hash_part):
        return error(400, "hash= must be the 32-character hash of a store path")
    resolved = await ctx.resolve(hash_part, contents_only=True)
    if resolved is None:
        return error(404, "no such path")
    if nix32_encode(resolved.info.nar_hash) != narhash:
        return error(404, "this store path's NAR has another hash now")
    return resolved


async def get_nar(ctx: Context, request: Request, match: re.Match[str]) -> Response:
    found = await _lookup(ctx, request.query_value("hash"), match["narhash"])
    if isinstance(found, Response):
        return found
    return await nar_response(ctx, request, found)


async def get_nar_legacy(ctx: Context, request: Request, match: re.Match[str]) -> Response:
    found = await _lookup(ctx, match["hash"], match["narhash"])
    if isinstance(found, Response):
        return found
    return await nar_response(ctx, request, found)


def _file_segments(region: FileRegion) -> Iterator[Segment]:
    yield region


def _bytes_slices(body: bytes) -> Callable[[int, int], bytes]:
    return lambda start, length: body[start : start + length]


def _copy_body(ctx: Context, copy: CompressedNar, nar_hash: bytes) -> Callable[[int, int], Body]:
    """`ranged`'s body maker for a compressed copy: its bytes when small (kept in memory for the
    next client), else sendfile."""
    path = os.fsencode(copy.path)
    if copy.file_size <= INLINE_MAX:
        small = read_small_file(path, copy.file_size)
        if small is not None:
            ctx.bodies.put(nar_hash, "zstd", small)
            return _bytes_slices(small)
    region = FileRegion(path, copy.file_size)
    return segment_slices(lambda: _file_segments(region), copy.file_size)


async def get_nar_zst(ctx: Context, request: Request, match: re.Match[str]) -> Response:
    """The compressed NAR: the copy when it exists, else the same bytes compressed on the fly
    (with their length once a copy was made before), so this URL never fails for a valid path."""
    found = await _lookup(ctx, request.query_value("hash"), match["narhash"])
    if isinstance(found, Response):
        return found
    if ctx.copies is None:
        return error(404, "compression is disabled on this cache")
    headers = [("Content-Type", NAR_TYPE), ("Cache-Control", IMMUTABLE), ("Accept-Ranges", "bytes")]
    if (kept := ctx.bodies.get(found.info.nar_hash, "zstd")) is not None:
        return ranged(request, headers, len(kept), _bytes_slices(kept))
    source = await ctx.store.nar(found.info)
    if not isinstance(source, FsNar):
        return error(404, "no compressed NAR with this store backend (nar_source = daemon)")
    copy = ctx.compressed_copy(found.info) if has_copy(found.info.nar_size) else None
    if copy is not None:
        return ranged(request, headers, copy.file_size, _copy_body(ctx, copy, found.info.nar_hash))
    headers = [("Content-Type", NAR_TYPE), ("Cache-Control", IMMUTABLE)]
    level = ctx.config.zstd_level
    if found.info.nar_size <= INLINE_MAX:
        # small NARs (most of a closure) are compressed at once, kept in memory, and sent whole
        # with their length: no thread hops, no chunked framing
        body = _compress_small(ctx, source, found.info, level)
        if body is not None:
            small = body
            return ranged(
                request,
                [*headers, ("Accept-Ranges", "bytes")],
                len(small),
                lambda start, length: small[start : start + length],
            )
    ctx.schedule_compression(found.info, source)
    # the copy's length is known if one was made before (and evicted since): the live stream is
    # byte for byte that copy. Without a copy there are no ranges (Range is ignored: a 200).
    meta = ctx.copies.meta(found.info.nar_hash)
    length = meta.file_size if meta is not None else None
    if request.method == "HEAD":
        return Response(200, headers, StreamBody(_nothing, length))
    nar_hash = found.info.nar_hash

    def stream() -> AsyncIterator[bytes]:
        return _zstd_stream(source, level, ctx.keep_live_copy(nar_hash), ctx.copy_kept)

    return Response(200, headers, StreamBody(stream, length))


def _compress_small(ctx: Context, source: FsNar, info: PathInfo, level: int) -> bytes | None:
    """A small NAR compressed in the event loop (microseconds) and kept in memory. Its copy on
    disk, if its size gets one, is the compressor's (asked for here and by the narinfo): writing
    it in the request path cost 125 µs of file operations a NAR, most of each NAR's time in a
    closure of older paths."""
    body = compressed_in_memory(source.segments, level)
    if body is None:
        return None  # the streaming path reports it
    ctx.bodies.put(info.nar_hash, "zstd", body)
    ctx.schedule_compression(info, source)
    return body


async def nar_response(ctx: Context, request: Request, resolved: Resolved) -> Response:
    info = resolved.info
    headers = [("Content-Type", NAR_TYPE), ("Cache-Control", IMMUTABLE), ("Vary", "Accept-Encoding")]
    wants_zstd = (
        ctx.config.enable_compression
        # a NAR this small gains nothing from zstd
        and info.nar_size >= MIN_COMPRESS_SIZE
        and request.accepts_encoding("zstd")
        and request.header("range") is None
    )
    if wants_zstd:
        coded = [*headers, ("Content-Encoding", "zstd")]
        if (kept := ctx.bodies.get(info.nar_hash, "zstd")) is not None:
            return Response(200, coded, kept)
        copy = ctx.compressed_copy(info) if has_copy(info.nar_size) else None
        if copy is not None:
            return Response(200, coded, _copy_body(ctx, copy, info.nar_hash)(0, copy.file_size))
        source = await ctx.store.nar(info)
        if isinstance(source, FsNar):
            files = source
            level = ctx.config.zstd_level  # the copy's bytes, whoever asks
            if info.nar_size <= INLINE_MAX:
                body = _compress_small(ctx, files, info, level)
                if body is not None:
                    return Response(200, coded, body)
            ctx.schedule_compression(info, files)
            return Response(
                200,
                coded,
                StreamBody(
                    lambda: _zstd_stream(files, level, ctx.keep_live_copy(info.nar_hash), ctx.copy_kept),
                    None,
                ),
            )
    headers.append(("Accept-Ranges", "bytes"))
    if (kept := ctx.bodies.get(info.nar_hash, "none")) is not None:
        return ranged(request, headers, len(kept), _bytes_slices(kept))
    source = await ctx.store.nar(info)
    if isinstance(source, FsNar):
        if (
            info.nar_size <= INLINE_MAX
            and (small := nar_in_memory(source.segments, info.nar_size)) is not None
        ):
            ctx.bodies.put(info.nar_hash, "none", small)
            return ranged(request, headers, info.nar_size, _bytes_slices(small))
        return ranged(request, headers, info.nar_size, segment_slices(source.segments, info.nar_size))
    return await _streamed(request, headers, source)


async def _streamed(request: Request, headers: list[tuple[str, str]], source: StreamedNar) -> Response:
    """A NAR from the daemon. The daemon is asked, and has started answering, before any header
    goes out: a daemon that cannot serve the path gives a 503, not a 200 cut short."""
    total = source.size
    selected = select_range(request, total)
    if isinstance(selected, Response):
        return selected
    start, length, status = selected.start, selected.length, selected.status
    headers = [*headers, *selected.headers]
    if request.method == "HEAD":
        return Response(status, headers, StreamBody(_nothing, length))
    stream = source.open()
    try:
        with trio.fail_after(DAEMON_FIRST_BYTE_TIMEOUT):
            first = await anext(stream, b"")
    except trio.TooSlowError as exc:
        await _close(stream)
        raise DaemonError("the nix-daemon did not start sending the NAR in time") from exc
    except BaseException:
        await _close(stream)
        raise

    async def chunks() -> AsyncIterator[bytes]:
        skip, left = start, length
        try:
            chunk = first
            while True:
                if skip >= len(chunk):
                    skip -= len(chunk)
                elif left:
                    piece = chunk[skip : skip + left]
                    skip = 0
                    left -= len(piece)
                    yield piece
                if not left and start + length < total:
                    break  # a range that ends early: the connection is dropped, not drained
                nxt = await anext(stream, None)
                if nxt is None:
                    break
                chunk = nxt
        finally:
            await _close(stream)

    # close: the daemon's stream is released even when the body is never started
    return Response(status, headers, StreamBody(chunks, length, lambda: _close(stream)))


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator


async def _close(stream: AsyncIterator[bytes]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with trio.CancelScope(shield=True):
            await aclose()


async def _zstd_stream(
    source: FsNar, level: int, keep: LiveCopy | None = None, kept: Callable[[bytes], None] | None = None
) -> AsyncIterator[bytes]:
    """Compress in a thread, a block at a time, so the event loop keeps serving; with `keep`, the
    bytes also become the compressed copy once the stream reached its end."""
    blocks = compress_chunks(iter_nar_bytes(source.segments()), level)
    done = object()

    def step() -> object:
        block = next(blocks, done)
        if keep is not None and isinstance(block, bytes):
            keep.write(block)
        return block

    finished = False
    try:
        while True:
            block = await trio.to_thread.run_sync(step)
            if block is done:
                break
            assert isinstance(block, bytes)
            yield block
        finished = True
    finally:
        if keep is not None:
            with trio.CancelScope(shield=True):
                # no fsync: the response ends now (a copy a crash cut short fails its size check)
                if finished and await trio.to_thread.run_sync(keep.finish, False) is not None and kept:
                    kept(keep.nar_hash)
                else:
                    keep.abort()
