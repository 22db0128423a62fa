"""zstd for NARs: compressed copies kept under the state directory, and the same bytes made live.

Nix 2.8 sends no Accept-Encoding, so HTTP content coding alone would never compress for it.
Instead the narinfo of every compressible path says `Compression: zstd` with a `.nar.zst` URL
from its first answer. That URL serves the copy (`sendfile`, Range) once it exists, and until
then the same bytes compressed on the fly: zstd's streaming output depends only on the input
bytes and the parameters, not on how the input is cut, so the live stream and the copy are
byte-identical and a narinfo a client cached stays true. Once a copy has been made its
FileHash/FileSize are known and added to the narinfo (only information is added; the URL never
changes); the `.meta` file that records them outlives an evicted copy.

Copies are made by a separate low-priority process (`cache.compressor`), so a full or read-only
state directory, or a crash while compressing, never takes a worker down.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from .hashes import nix32_encode
from .nar import NarError, Segment, read_region

# below this zstd saves fewer bytes than FileHash/FileSize add to the narinfo; above it even
# incompressible contents gain from the NAR framing's padding and repeated strings
MIN_COMPRESS_SIZE = 512
NEGATIVE_TTL = 1.0
MEMO_ENTRIES = 100_000
META_MAX = 4096  # a .meta is under 200 bytes
CHUNK = 1 << 20
SAMPLE_BYTES = 128 * 1024
# a sample that zstd cannot shrink below this share is already compressed (or random)
COMPRESSIBLE_RATIO = 0.9
EVICT_CHECK_BYTES = 1 << 20
# other processes add copies too: the running total is refreshed from a listing this often
RESCAN_SECONDS = 10.0
SMALL_NAR = 256 * 1024  # compressed whole when asked for (routes/nar.py), never sampled
# NARs up to this size get no copy on disk: each worker compresses one in memory when it is
# learnt or first asked for (4 KiB in about 13 µs, 16 KiB in 50) and keeps it with its small
# bodies. Making a copy (two files, an fsync) cost more than that many compressions, and made
# while a client walked a closure of older paths it took CPU from the client (0.79 → 0.86× Caddy)
COPYLESS_MAX = 16 * 1024
FRAME_SLACK = 64  # zstd's frame and block headers: an incompressible NAR grows by at most this


@dataclass(frozen=True, slots=True)
class CopyMeta:
    """FileHash and FileSize of a path's compressed NAR (known once a copy was made)."""

    file_hash: bytes
    file_size: int


@dataclass(frozen=True, slots=True)
class CompressedNar:
    path: Path | str
    file_hash: bytes
    file_size: int


class StateDirectoryError(Exception):
    """The state directory cannot take a copy (full, read-only, not ours): `reason` names which."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def condition(exc: OSError) -> str:
    """A short, stable name for what is wrong with the state directory."""
    return {
        errno.ENOSPC: "full",
        errno.EDQUOT: "full",
        errno.EROFS: "read-only",
        errno.EACCES: "not-writable",
        errno.EPERM: "not-writable",
    }.get(exc.errno or 0, "io-error")


def params_tag(level: int) -> str:
    """What the compressed bytes depend on besides the NAR: a copy made otherwise is not reused."""
    return f"zstandard-{zstandard.__version__}-level-{level}"


def iter_nar_bytes(segments: Iterator[Segment]) -> Iterator[bytes]:
    for seg in segments:
        if isinstance(seg, bytes):
            yield seg
        else:
            yield from read_region(seg, CHUNK)


def nar_in_memory(segments: Callable[[], Iterator[Segment]], length: int) -> bytes | None:
    """A small NAR read whole (page-cached metadata and contents of a few KiB). None when it
    cannot be read or has another length now: the streamed path then reports it."""
    try:
        body = b"".join(iter_nar_bytes(segments()))
    except (NarError, OSError):
        return None
    return body if len(body) == length else None


def compress_chunks(chunks: Iterator[bytes], level: int) -> Iterator[bytes]:
    """zstd frames of the concatenated chunks: the same bytes for copies and live streams."""
    comp = zstandard.ZstdCompressor(level=level).compressobj()
    for chunk in chunks:
        out = comp.compress(chunk)
        if out:
            yield out
    tail = comp.flush()
    if tail:
        yield tail


_WHOLE: dict[int, zstandard.ZstdCompressor] = {}


def compress_whole(chunks: Iterator[bytes], level: int) -> bytes:
    """A small NAR's compressed bytes at once: the same bytes as `compress_chunks`, with one
    compression context per process and level kept between calls (making one costs more than
    compressing a few KiB: 32 against 13 µs for 5 KiB here)."""
    cctx = _WHOLE.get(level)
    if cctx is None:
        cctx = _WHOLE[level] = zstandard.ZstdCompressor(level=level)
    comp = cctx.compressobj()
    out = [comp.compress(chunk) for chunk in chunks]
    out.append(comp.flush())
    return b"".join(out)


def compressed_in_memory(segments: Callable[[], Iterator[Segment]], level: int) -> bytes | None:
    """A small NAR compressed whole: the bytes a copy would hold. None when it cannot be read
    now (the streamed path then reports it)."""
    try:
        return compress_whole(iter_nar_bytes(segments()), level)
    except (NarError, OSError):
        return None


def has_copy(nar_size: int) -> bool:
    """Whether a compressed NAR of this size is kept as a copy on disk (else in memory only)."""
    return nar_size > COPYLESS_MAX


def looks_compressible(segments: Iterator[Segment]) -> bool:
    """Whether zstd shrinks the NAR's first bytes: a cheap test that skips already-compressed
    content. Deterministic, so every worker decides the same for a path."""
    sample = bytearray()
    for seg in segments:
        if isinstance(seg, bytes):
            sample += seg
        else:
            for piece in read_region(seg, SAMPLE_BYTES - len(sample)):
                sample += piece
                if len(sample) >= SAMPLE_BYTES:
                    break
        if len(sample) >= SAMPLE_BYTES:
            break
    if len(sample) < MIN_COMPRESS_SIZE:
        return False
    return len(zstandard.ZstdCompressor(level=1).compress(bytes(sample))) <= COMPRESSIBLE_RATIO * len(sample)


def _source_errors(blocks: Iterator[bytes]) -> Iterator[bytes]:
    """Reading the store is not writing the state directory: its errors are the NAR's."""
    try:
        yield from blocks
    except OSError as exc:
        raise NarError(f"cannot read the store path: {exc}") from exc


class CopyStore:
    """Compressed NAR copies named by NAR hash: `<nix32>.nar.zst` with a `.meta` JSON beside.

    Blocking filesystem work; the worker only reads (`meta`, `lookup`), the compressor process
    writes (`build`, `evict`)."""

    def __init__(self, directory: Path, level: int, max_bytes: int) -> None:
        self.dir = directory
        self.level = level
        self.max_bytes = max_bytes
        self.tag = params_tag(level)
        self._prefix = f"{os.fspath(directory)}{os.sep}"
        self._total: int | None = None  # the copies' bytes at the last listing, plus ours since
        self._listed_at = 0.0

    def paths(self, nar_hash: bytes) -> tuple[Path, Path]:
        name = nix32_encode(nar_hash)
        return self.dir / f"{name}.nar.zst", self.dir / f"{name}.meta"

    def data_file(self, nar_hash: bytes) -> str:
        return f"{self._prefix}{nix32_encode(nar_hash)}.nar.zst"

    def meta(self, nar_hash: bytes) -> CopyMeta | None:
        # on every new path's first narinfo: plain os calls on a string, not pathlib
        try:
            fd = os.open(f"{self._prefix}{nix32_encode(nar_hash)}.meta", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            raw = os.read(fd, META_MAX)
        except OSError:
            return None
        finally:
            os.close(fd)
        try:
            doc = json.loads(raw)
            if doc.get("params") != self.tag:
                return None
            return CopyMeta(bytes.fromhex(str(doc["sha256"])), int(doc["size"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def lookup(self, nar_hash: bytes) -> CompressedNar | None:
        meta = self.meta(nar_hash)
        if meta is None:
            return None
        data_path = self.paths(nar_hash)[0]
        try:
            size = data_path.stat().st_size
        except OSError:
            return None
        if size != meta.file_size:
            return None
        return CompressedNar(data_path, meta.file_hash, size)

    def build(self, nar_hash: bytes, segments: Callable[[], Iterator[Segment]]) -> CompressedNar | None:
        """Compress one NAR into the store. None when another process holds the NAR's lock;
        `StateDirectoryError` when the directory cannot take it (nothing is left behind).

        An flock on the temporary file keeps processes from compressing the same NAR twice; the
        file is renamed into place while still locked, so nobody truncates a finished copy.
        """
        data_path, meta_path = self.paths(nar_hash)
        tmp = data_path.with_suffix(".tmp")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StateDirectoryError(
                condition(exc), f"cannot write under {self.dir}: {exc.strerror}"
            ) from exc
        out = os.fdopen(fd, "wb")
        try:
            try:
                # a lock, not the file's existence, says someone is on it: a crashed
                # process's leftover is simply overwritten
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            os.ftruncate(fd, 0)
            digest = hashlib.sha256()
            size = 0
            for n, block in enumerate(
                _source_errors(compress_chunks(iter_nar_bytes(segments()), self.level))
            ):
                out.write(block)
                digest.update(block)
                size += len(block)
                if n % 16 == 15 and (made := self.lookup(nar_hash)) is not None:
                    with contextlib.suppress(OSError):
                        tmp.unlink()
                    return made  # a live stream kept its bytes first
            out.flush()
            os.fsync(fd)  # ENOSPC on a delayed write shows here, not after the rename
            meta_tmp = meta_path.with_suffix(".meta-tmp")
            meta_tmp.write_text(json.dumps({"sha256": digest.hexdigest(), "size": size, "params": self.tag}))
            os.replace(tmp, data_path)
            os.replace(meta_tmp, meta_path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            with contextlib.suppress(OSError):
                meta_path.with_suffix(".meta-tmp").unlink()
            raise StateDirectoryError(
                condition(exc), f"cannot write a compressed copy under {self.dir}: {exc.strerror}"
            ) from exc
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        finally:
            with contextlib.suppress(OSError):
                out.close()
        self.evict(keep=data_path, added=size)
        return CompressedNar(data_path, digest.digest(), size)

    def sweep_copyless(self) -> int:
        """Removes the copies (and their `.meta`) of NARs up to COPYLESS_MAX that earlier versions
        made: nothing reads them any more. Once per state directory (a marker file says it was
        done); each copy small enough on disk is decompressed, at most COPYLESS_MAX + 1 bytes of
        it, to learn its NAR's size. How many were removed."""
        marker = self.dir / f".swept-copyless-{COPYLESS_MAX}"
        if marker.exists() or not self.dir.is_dir():
            return 0
        removed = 0
        with os.scandir(self.dir) as entries:
            for entry in entries:
                if not entry.name.endswith(".nar.zst"):
                    continue
                try:
                    if entry.stat(follow_symlinks=False).st_size > COPYLESS_MAX + FRAME_SLACK:
                        continue
                    with open(entry.path, "rb") as f:
                        data = f.read(COPYLESS_MAX + FRAME_SLACK + 1)
                    nar = b""
                    with zstandard.ZstdDecompressor().stream_reader(data) as reader:
                        # bounded, however well it compressed
                        while len(nar) <= COPYLESS_MAX and (
                            piece := reader.read(COPYLESS_MAX + 1 - len(nar))
                        ):
                            nar += piece
                except (OSError, zstandard.ZstdError):
                    continue  # not ours to judge: eviction deals with it
                if len(nar) > COPYLESS_MAX:
                    continue
                for path in (entry.path, entry.path.removesuffix(".nar.zst") + ".meta"):
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                removed += 1
        with contextlib.suppress(OSError):
            marker.touch()
        self._total = None  # the budget's running total: listed again
        return removed

    def evict(self, keep: Path, added: int = 0) -> None:
        """Oldest copies first, until the copies fit the budget. Their `.meta` stays: the
        narinfo keeps its FileHash/FileSize, and the live stream sends the same bytes.

        The directory is listed (a stat per copy) only when the running total may exceed the
        budget or is older than RESCAN_SECONDS: listing it for every copy made a closure of new
        paths quadratic in the number of copies."""
        now = time.monotonic()
        if self._total is not None and now - self._listed_at < RESCAN_SECONDS:
            self._total += added
            if self._total <= self.max_bytes:
                return
        entries = []
        for p in self.dir.glob("*.nar.zst"):
            with contextlib.suppress(OSError):
                st = p.stat()
                entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue  # the copy just made is about to be advertised
            with contextlib.suppress(OSError):
                path.unlink()
            total -= size
        self._total, self._listed_at = total, now

    def locked(self, nar_hash: bytes) -> bool:
        try:
            fd = os.open(self.paths(nar_hash)[0].with_suffix(".tmp"), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


class LiveCopy:
    """The bytes of a live stream kept as the copy, so that a client waiting for a fresh path's
    NAR pays for its compression once, and the background job finds the copy made. Any error of
    the state directory only ends the keeping, never the stream; a stream that does not reach its
    end leaves nothing. The bytes are the copy's by construction (same input, same level), so it
    does not matter whether this or the background job renames its file into place first."""

    def __init__(self, copies: CopyStore, nar_hash: bytes) -> None:
        self.copies = copies
        self.nar_hash = nar_hash
        self.data_path, self.meta_path = copies.paths(nar_hash)
        self.tmp = self.data_path.with_name(f"{self.data_path.name}.live-{os.getpid()}-{id(self):x}")
        self.digest = hashlib.sha256()
        self.size = 0
        self.failed: str | None = None
        try:
            self._fd: int | None = os.open(
                self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
            )
        except OSError as exc:
            self._fd = None
            self.failed = condition(exc)

    def write(self, block: bytes) -> None:
        if self._fd is None:
            return
        try:
            view = memoryview(block)
            while view:
                view = view[os.write(self._fd, view) :]
            self.digest.update(block)
            self.size += len(block)
        except OSError as exc:
            self.failed = condition(exc)
            self.abort()

    def finish(self, durable: bool = True) -> CompressedNar | None:
        """The stream reached its end: the file becomes the copy (blocking; run it in a thread).
        Without `durable` there is no fsync: a copy cut short by a crash has a size its `.meta`
        does not match, and is not used."""
        if self._fd is None:
            return None
        fd, self._fd = self._fd, None
        meta_tmp = self.tmp.with_name(self.tmp.name + ".meta")
        try:
            if durable:
                os.fsync(fd)
            os.close(fd)
            meta = {"sha256": self.digest.hexdigest(), "size": self.size, "params": self.copies.tag}
            meta_tmp.write_text(json.dumps(meta))
            os.replace(self.tmp, self.data_path)
            os.replace(meta_tmp, self.meta_path)
        except OSError as exc:
            self.failed = condition(exc)
            for leftover in (self.tmp, meta_tmp):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            return None
        if self.size > EVICT_CHECK_BYTES:  # small copies leave the budget to the compressor's checks
            with contextlib.suppress(OSError):
                self.copies.evict(keep=self.data_path, added=self.size)
        return CompressedNar(self.data_path, self.digest.digest(), self.size)

    def abort(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        with contextlib.suppress(OSError):
            self.tmp.unlink()


class CopyIndex:
    """The worker's memory of the copies: what is known is remembered (a found copy is re-checked
    with one stat when served), what is absent for a second, since another process may finish it."""

    def __init__(self, copies: CopyStore) -> None:
        self.copies = copies
        self._meta: dict[bytes, tuple[float, CopyMeta | None]] = {}
        self._compressible: dict[bytes, bool] = {}

    def meta(self, nar_hash: bytes) -> CopyMeta | None:
        now = time.monotonic()
        hit = self._meta.get(nar_hash)
        if hit is not None and (hit[1] is not None or now - hit[0] < NEGATIVE_TTL):
            return hit[1]
        found = self.copies.meta(nar_hash)
        if len(self._meta) >= MEMO_ENTRIES:
            self._meta.clear()
        self._meta[nar_hash] = (now, found)
        return found

    def copy(self, nar_hash: bytes) -> CompressedNar | None:
        meta = self.meta(nar_hash)
        if meta is None:
            return None
        data_file = self.copies.data_file(nar_hash)
        try:
            if os.stat(data_file).st_size != meta.file_size:
                return None
        except OSError:
            return None  # evicted: the live stream sends the same bytes
        return CompressedNar(data_file, meta.file_hash, meta.file_size)

    def forget(self, nar_hash: bytes) -> None:
        self._meta.pop(nar_hash, None)

    def compressible(self, nar_hash: bytes, size: int, segments: Callable[[], Iterator[Segment]]) -> bool:
        if size < MIN_COMPRESS_SIZE:
            return False
        if size <= SMALL_NAR:
            # not worth a sample: zstd's framing on an incompressible small NAR is a few bytes, and
            # a closure's narinfos are answered without reading the paths
            return True
        known = self._compressible.get(nar_hash)
        if known is None:
            try:
                known = looks_compressible(segments())
            except (OSError, NarError):
                return False  # unreadable now: decided (and remembered) on a later request
            if len(self._compressible) >= MEMO_ENTRIES:
                self._compressible.clear()
            self._compressible[nar_hash] = known
        return known
