"""A NAR upload, streamed to a file under the state directory while it is hashed.

The file keeps the *decompressed* NAR (what the daemon imports); two sha256 run as it arrives:
of the bytes received (the narinfo's FileHash, the name in the URL) and of the NAR (NarHash).
Decompression output is bounded by the same limit as the NAR, so a small xz bomb cannot fill
the disk. CPU work and writes run in a worker thread, never on the event loop.
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import lzma
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio
import zstandard

BATCH = 1 << 20


class NarBodyError(Exception):
    """The uploaded bytes are not what they claim (status 400) or too many (status 413)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class ReceivedNar:
    path: Path  # the decompressed NAR
    nar_hash: bytes
    nar_size: int
    file_hash: bytes
    file_size: int


class _Sink:
    """Where decompressed bytes go: hashed, counted, written; over the limit is an error."""

    def __init__(self, fd: int, limit: int) -> None:
        self.fd = fd
        self.limit = limit
        self.size = 0
        self.hash = hashlib.sha256()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = len(data)
        self.size += n
        if self.size > self.limit:
            raise NarBodyError(413, f"the decompressed NAR is over the limit of {self.limit} bytes")
        self.hash.update(data)
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        return n

    def flush(self) -> None:
        pass


class _Decoder(Protocol):
    def feed(self, data: bytes) -> None: ...
    def finish(self) -> None: ...


class _Identity:
    def __init__(self, sink: _Sink) -> None:
        self.sink = sink

    def feed(self, data: bytes) -> None:
        self.sink.write(data)

    def finish(self) -> None:
        pass


class _Incremental:
    """lzma and bz2: decompress with bounded output per step."""

    STEP = 4 << 20

    def __init__(
        self, sink: _Sink, make: Callable[[], lzma.LZMADecompressor | bz2.BZ2Decompressor], what: str
    ):
        self.sink = sink
        self.dec = make()
        self.what = what

    def feed(self, data: bytes) -> None:
        if self.dec.eof:
            if data:
                raise NarBodyError(400, f"bytes after the end of the {self.what} stream")
            return
        try:
            out = self.dec.decompress(data, max_length=self.STEP)
            self.sink.write(out)
            while not self.dec.eof and not self.dec.needs_input:
                self.sink.write(self.dec.decompress(b"", max_length=self.STEP))
        except (lzma.LZMAError, OSError, EOFError) as exc:
            raise NarBodyError(400, f"the NAR is not valid {self.what}: {exc}") from exc
        if self.dec.eof and self.dec.unused_data:
            raise NarBodyError(400, f"bytes after the end of the {self.what} stream")

    def finish(self) -> None:
        if not self.dec.eof:
            raise NarBodyError(400, f"the {self.what} stream ends early")


class _Zstd:
    """Bounded output through the stream writer. A frame cut short goes unnoticed here; the NAR
    hash check against the narinfo refuses it."""

    def __init__(self, sink: _Sink) -> None:
        self.writer = zstandard.ZstdDecompressor().stream_writer(
            sink,  # type: ignore[arg-type]  # any object with write() is accepted
            write_size=1 << 20,
            closefd=False,
        )
        self.fed = 0

    def feed(self, data: bytes) -> None:
        self.fed += len(data)
        try:
            self.writer.write(data)
        except zstandard.ZstdError as exc:
            raise NarBodyError(400, f"the NAR is not valid zstd: {exc}") from exc

    def finish(self) -> None:
        try:
            self.writer.flush()  # type: ignore[no-untyped-call]
        except zstandard.ZstdError as exc:
            raise NarBodyError(400, f"the NAR is not valid zstd: {exc}") from exc
        if self.fed == 0:
            raise NarBodyError(400, "an empty zstd body")


def _decoder(compression: str, sink: _Sink) -> _Decoder:
    if compression == "none":
        return _Identity(sink)
    if compression == "xz":
        return _Incremental(sink, lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ), "xz")
    if compression == "bzip2":
        return _Incremental(sink, bz2.BZ2Decompressor, "bzip2")
    if compression == "zstd":
        return _Zstd(sink)
    raise ValueError(f"unknown compression {compression!r}")


async def receive_nar(
    receive: Callable[[int], Awaitable[bytes]],
    compression: str,
    directory: Path,
    *,
    max_bytes: int,
    idle_timeout: float,
    declared_length: int | None = None,
) -> ReceivedNar:
    """Read the body until its end into a new file in `directory` (removed again on any failure)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, name = _mkstemp(directory)
    path = Path(name)
    ok = False
    try:
        sink = _Sink(fd, max_bytes)
        decoder = _decoder(compression, sink)
        file_hash = hashlib.sha256()
        file_size = 0
        pending: list[bytes] = []
        pending_size = 0

        def step(chunks: list[bytes]) -> None:
            for chunk in chunks:
                file_hash.update(chunk)
                decoder.feed(chunk)

        while True:
            with trio.fail_after(idle_timeout):
                data = await receive(1 << 16)
            if data:
                file_size += len(data)
                if file_size > max_bytes:
                    raise NarBodyError(413, f"the NAR is over the limit of {max_bytes} bytes")
                pending.append(data)
                pending_size += len(data)
                if pending_size < BATCH:
                    continue
            if pending:
                batch, pending, pending_size = pending, [], 0
                await trio.to_thread.run_sync(step, batch)
            if not data:
                break
        await trio.to_thread.run_sync(decoder.finish)
        if declared_length is not None and file_size != declared_length:
            raise NarBodyError(400, f"the body has {file_size} bytes, Content-Length said {declared_length}")
        await trio.to_thread.run_sync(os.fsync, fd)
        ok = True
        return ReceivedNar(path, sink.hash.digest(), sink.size, file_hash.digest(), file_size)
    finally:
        os.close(fd)
        if not ok:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _mkstemp(directory: Path) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(prefix="upload-", suffix=".nar", dir=directory)
