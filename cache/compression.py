"""zstd for NARs: compressed copies kept under the state directory, and on-the-fly streams.

Nix 2.8 sends no Accept-Encoding, so HTTP content coding alone would never compress for it.
Instead the narinfo of a path whose compressed copy exists says `Compression: zstd` with a
`.nar.zst` URL and exact FileHash/FileSize: such a file has a Content-Length and resumes with
Range like any static file. Copies are made in the background after a narinfo is asked for
(so the second host of a fleet gets the compressed file), and evicted oldest-first past a size.
Clients that send `Accept-Encoding: zstd` get `Content-Encoding: zstd` as from harmonia.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import trio
import zstandard

from .hashes import nix32_encode
from .nar import Segment, read_region

log = logging.getLogger("harmonia.compression")

MIN_COMPRESS_SIZE = 4096
NEGATIVE_TTL = 1.0
MEMO_ENTRIES = 100_000
CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class CompressedNar:
    path: Path
    file_hash: bytes
    file_size: int


def iter_nar_bytes(segments: Iterator[Segment]) -> Iterator[bytes]:
    for seg in segments:
        if isinstance(seg, bytes):
            yield seg
        else:
            yield from read_region(seg, CHUNK)


def compress_chunks(chunks: Iterator[bytes], level: int) -> Iterator[bytes]:
    """zstd frames of the concatenated chunks. Used both for copies and for live streams."""
    comp = zstandard.ZstdCompressor(level=level).compressobj()
    for chunk in chunks:
        out = comp.compress(chunk)
        if out:
            yield out
    tail = comp.flush()
    if tail:
        yield tail


class ZstdCache:
    """Compressed NAR copies named by NAR hash: `<nix32>.nar.zst` with a `.meta` JSON beside."""

    def __init__(self, directory: Path, level: int, max_bytes: int) -> None:
        self.dir = directory
        self.level = level
        self.max_bytes = max_bytes
        self._pending: set[bytes] = set()
        self._memo: dict[bytes, tuple[float, CompressedNar | None]] = {}
        self._limiter = trio.CapacityLimiter(1)  # one background compression per worker

    def ensure_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    def _paths(self, nar_hash: bytes) -> tuple[Path, Path]:
        name = nix32_encode(nar_hash)
        return self.dir / f"{name}.nar.zst", self.dir / f"{name}.meta"

    def cached_lookup(self, nar_hash: bytes) -> CompressedNar | None:
        """`lookup` with memory: a found copy is remembered (and re-checked when served), an
        absent one for a second, since another worker may finish it meanwhile."""
        now = time.monotonic()
        hit = self._memo.get(nar_hash)
        if hit is not None:
            if hit[1] is not None and os.path.exists(hit[1].path):
                return hit[1]  # one stat: another worker may have evicted it
            if hit[1] is None and now - hit[0] < NEGATIVE_TTL:
                return None
        found = self.lookup(nar_hash)
        if len(self._memo) >= MEMO_ENTRIES:
            self._memo.clear()
        self._memo[nar_hash] = (now, found)
        return found

    def forget(self, nar_hash: bytes) -> None:
        self._memo.pop(nar_hash, None)

    def lookup(self, nar_hash: bytes) -> CompressedNar | None:
        data_path, meta_path = self._paths(nar_hash)
        try:
            meta = json.loads(meta_path.read_bytes())
            size = data_path.stat().st_size
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("size") != size:
            return None
        try:
            return CompressedNar(data_path, bytes.fromhex(str(meta["sha256"])), size)
        except (KeyError, ValueError):
            return None

    def build(self, nar_hash: bytes, segments: Callable[[], Iterator[Segment]]) -> CompressedNar | None:
        """Compress one NAR into the cache (blocking; run it in a thread).

        An flock on the temporary file keeps worker processes from compressing the same NAR twice;
        the file is renamed into place while still locked, so nobody truncates a finished copy.
        """
        data_path, meta_path = self._paths(nar_hash)
        tmp = data_path.with_suffix(".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            log.warning("cannot write compressed NARs under %s: %s", self.dir, exc.strerror)
            return None
        try:
            # a lock, not the file's existence, says someone is on it: a crashed worker's
            # leftover is simply overwritten
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        digest = hashlib.sha256()
        size = 0
        out = os.fdopen(fd, "wb")
        try:
            for block in compress_chunks(iter_nar_bytes(segments()), self.level):
                out.write(block)
                digest.update(block)
                size += len(block)
            out.flush()
            os.replace(tmp, data_path)
            meta_path.write_text(json.dumps({"sha256": digest.hexdigest(), "size": size}))
            self.forget(nar_hash)
        except Exception as exc:
            log.warning("compressing NAR %s failed: %s", nix32_encode(nar_hash), exc)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return None
        finally:
            out.close()
        self._evict(keep=data_path)
        return CompressedNar(data_path, digest.digest(), size)

    def _evict(self, keep: Path) -> None:
        try:
            entries = [(p.stat().st_mtime, p.stat().st_size, p) for p in self.dir.glob("*.nar.zst")]
        except OSError:
            return
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue  # the copy just made is about to be advertised
            with contextlib.suppress(OSError):
                path.with_suffix("").with_suffix(".meta").unlink()
                path.unlink()
            total -= size

    async def ensure(
        self, nar_hash: bytes, segments: Callable[[], Iterator[Segment]]
    ) -> CompressedNar | None:
        """The copy, made now if missing (waits for it)."""
        found = self.lookup(nar_hash)
        if found is not None:
            return found
        for _ in range(2):
            built = await trio.to_thread.run_sync(self.build, nar_hash, segments, abandon_on_cancel=True)
            if built is not None:
                return built
            # another worker holds the lock: wait for its result while it works
            for _ in range(1200):
                await trio.sleep(0.1)
                if (found := self.lookup(nar_hash)) is not None:
                    return found
                if not self._locked(nar_hash):
                    break
        return self.lookup(nar_hash)

    def _locked(self, nar_hash: bytes) -> bool:
        try:
            fd = os.open(self._paths(nar_hash)[0].with_suffix(".tmp"), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def schedule(
        self, nursery: trio.Nursery, nar_hash: bytes, size: int, segments: Callable[[], Iterator[Segment]]
    ) -> None:
        if size < MIN_COMPRESS_SIZE or nar_hash in self._pending:
            return
        self._pending.add(nar_hash)

        async def job() -> None:
            try:
                async with self._limiter:
                    if self.lookup(nar_hash) is None:
                        await trio.to_thread.run_sync(self.build, nar_hash, segments, abandon_on_cancel=True)
            finally:
                self._pending.discard(nar_hash)

        nursery.start_soon(job)
