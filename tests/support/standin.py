"""A stand-in store and in-memory transports for fast unit tests of the routes and the transport.

The store holds real files under a temporary directory (its "real" store) and answers the
`Store` interface from a dict, as the Nix database would; no Nix is involved. Real Nix stays
the judge in tests/e2e/.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import trio
import trio.testing

from cache.app import App
from cache.config import Config
from cache.metrics import Metrics
from cache.nar import FileRegion, nar_bytes, read_region
from cache.narinfo import PathInfo
from cache.store import FsNar, StreamedNar, real_path
from cache.transport.delivery import Handler
from cache.transport.h1server import H1Connection
from cache.transport.messages import Response, SegmentsBody, StreamBody

STORE = "/nix/store"


class StandInStore:
    """The `Store` interface over files in `root`: `add()` a tree, then ask for it."""

    def __init__(self, root: Path, *, streamed: bool = False) -> None:
        self.root = root
        self.store_dir = STORE
        self.streamed = streamed  # answer NARs as a daemon would (a byte stream), not files
        self.infos: dict[str, PathInfo] = {}
        self.queries = 0

    def add(self, name: str, make: Callable[[Path], None], *, references: tuple[str, ...] = ()) -> PathInfo:
        digest = hashlib.sha256(name.encode()).hexdigest()
        hash_part = "".join("0123456789abcdfghijklmnpqrsvwxyz"[int(c, 16) % 32] for c in digest[:32])
        real = self.root / f"{hash_part}-{name}"
        make(real)
        data = nar_bytes(real)
        info = PathInfo(
            path=f"{STORE}/{hash_part}-{name}",
            nar_hash=hashlib.sha256(data).digest(),
            nar_size=len(data),
            references=references,
        )
        self.infos[hash_part] = info
        return info

    async def path_from_hash_part(self, hash_part: str) -> str | None:
        await trio.lowlevel.checkpoint()
        self.queries += 1
        info = self.infos.get(hash_part)
        return info.path if info else None

    async def path_info(self, path: str) -> PathInfo | None:
        await trio.lowlevel.checkpoint()
        return next((i for i in self.infos.values() if i.path == path), None)

    async def info_from_hash_part(self, hash_part: str) -> PathInfo | None:
        await trio.lowlevel.checkpoint()
        self.queries += 1
        return self.infos.get(hash_part)

    def servable(self, info: PathInfo) -> bool:
        return os.path.lexists(self.real_path(info.path))

    def fs_nar(self, info: PathInfo) -> FsNar | None:
        return None if self.streamed else FsNar(self.real_path(info.path), info.nar_size)

    def real_path(self, path: str) -> bytes:
        return real_path(path, STORE, str(self.root))

    async def nar(self, info: PathInfo) -> FsNar | StreamedNar:
        fs = FsNar(self.real_path(info.path), info.nar_size)
        if not self.streamed:
            return fs

        async def stream() -> AsyncIterator[bytes]:
            data = nar_bytes(fs.root)
            for i in range(0, len(data), 4096):
                await trio.lowlevel.checkpoint()
                yield data[i : i + 4096]

        return StreamedNar(info.nar_size, stream)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def make_app(store: StandInStore, tmp_path: Path, **config: object) -> App:
    settings: dict[str, object] = {
        "enable_compression": False,
        "state_directory": tmp_path / "state",
        "nix_db_path": tmp_path / "var" / "nix" / "db" / "db.sqlite",
    }
    settings.update(config)
    return App(Config(**settings), [], Metrics(1), store=store)  # type: ignore[arg-type]


async def body_bytes(resp: Response) -> bytes:
    """A response's whole body, as a transport would send it."""
    body = resp.body
    if isinstance(body, bytes):
        return body
    out = bytearray()
    if isinstance(body, SegmentsBody):
        for seg in body.segments():
            if isinstance(seg, FileRegion):
                for chunk in read_region(seg):
                    out += chunk
            else:
                out += seg
        return bytes(out)
    assert isinstance(body, StreamBody)
    try:
        async for chunk in body.chunks():
            out += chunk
    finally:
        if body.close is not None:
            await body.close()
    return bytes(out)


async def h1_exchange(
    handler: Handler, raw: bytes, *, metrics: Metrics | None = None, half_close: bool = True
) -> bytes:
    """Send `raw` to an HTTP/1.1 connection over an in-memory stream (then end the client's side
    when `half_close`); all the server answers until it closes."""
    client, server = trio.testing.memory_stream_pair()
    conn = H1Connection(server, handler, metrics or Metrics(1), sock=None, client="test")
    out = bytearray()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            await client.send_all(raw)
            if half_close:
                await client.send_stream.aclose()
            while True:
                try:
                    data = await client.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not data:
                    break
                out += data
    return bytes(out)
