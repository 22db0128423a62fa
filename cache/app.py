"""The application: configuration, store, keys and caches, and the dispatch of requests to routes.

`App` implements `context.Context`, the interface the routes are written against.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from pathlib import Path

import trio

from . import __version__
from .compression import CompressedNar, ZstdCache
from .config import Config
from .context import Resolved
from .daemon import DaemonStore
from .hashes import nix32_encode
from .metrics import Metrics
from .narinfo import NarInfo, NarLocation, PathInfo, signatures
from .push.service import PushService
from .routes import dispatch
from .signing import PublicKey, Signer
from .store import DbStore, Store, StoreError
from .transport.messages import Request, Response, error

log = logging.getLogger("harmonia.app")


class NarinfoCache:
    """Rendered, signed narinfo texts. Signing costs real microseconds and rarely changes; the key
    includes everything the text depends on, so a new signature or a new location renders anew."""

    def __init__(self, entries: int) -> None:
        self._entries = entries
        self._items: OrderedDict[tuple[object, ...], NarInfo] = OrderedDict()

    def get(self, key: tuple[object, ...]) -> NarInfo | None:
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
        return found

    def put(self, key: tuple[object, ...], value: NarInfo) -> None:
        if self._entries <= 0:
            return
        self._items[key] = value
        if len(self._items) > self._entries:
            self._items.popitem(last=False)


def default_state_directory(config: Config) -> Path:
    if config.state_directory is not None:
        return config.state_directory
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "harmonia-cache"


def make_store(config: Config) -> Store:
    if config.store_backend == "daemon":
        return DaemonStore(
            config.daemon_socket,
            config.virtual_nix_store,
            config.real_nix_store,
            prefer_files=config.nar_source == "auto",
        )
    return DbStore(config.nix_db_path, config.virtual_nix_store, config.real_nix_store)


class App:
    def __init__(
        self,
        config: Config,
        signers: list[Signer],
        metrics: Metrics | None = None,
        store: Store | None = None,
    ) -> None:
        self.config = config
        self.store = store if store is not None else make_store(config)
        self.signers = signers
        self.public_keys: list[PublicKey] = [signer.public_key() for signer in signers]
        self.metrics = metrics or Metrics(1)
        self.narinfo_cache = NarinfoCache(config.narinfo_cache_entries)
        self.started = time.time()
        self.version = __version__
        self.zstd: ZstdCache | None = None
        if config.enable_compression:
            self.zstd = ZstdCache(
                default_state_directory(config) / "nar-zstd",
                config.zstd_level,
                config.compressed_cache_max_bytes,
            )
        # <state>/nix/db/db.sqlite beside <state>/log/nix/drvs, as Nix lays them out
        parents = config.nix_db_path.parents
        self.log_dir = (parents[2] if len(parents) > 2 else Path("/nix/var")) / "log" / "nix" / "drvs"
        self.push: PushService | None = None
        if config.push.enable:
            self.push = PushService(
                config.push, default_state_directory(config), config.daemon_socket, config.virtual_nix_store
            )
        self._nursery: trio.Nursery | None = None

    async def run_background(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hosts background work (compression) for the lifetime of the worker."""
        if self.zstd is not None:
            try:
                self.zstd.ensure_dir()
            except OSError as exc:
                log.warning(
                    "compressed NAR copies disabled: cannot create %s: %s", self.zstd.dir, exc.strerror
                )
                self.zstd = None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.push is not None:
                await nursery.start(self.push.run_sweeps)
            task_status.started()
            await trio.sleep_forever()

    async def aclose(self) -> None:
        await self.store.aclose()

    # --- lookups shared by the routes -------------------------------------------------

    async def resolve(self, hash_part: str) -> Resolved | None:
        """A valid path whose NAR this process can produce, or None (a 404)."""
        info = await self.store.info_from_hash_part(hash_part)
        if info is None or not self.store.servable(info):
            return None
        return Resolved(hash_part, info)

    def compressed_copy(self, info: PathInfo) -> CompressedNar | None:
        if self.zstd is None:
            return None
        return self.zstd.cached_lookup(info.nar_hash)

    def schedule_compression(self, info: PathInfo) -> None:
        if self.zstd is None or self._nursery is None:
            return
        nar = self.store.fs_nar(info)
        if nar is not None:
            self.zstd.schedule(self._nursery, info.nar_hash, info.nar_size, nar.segments)

    def narinfo(self, resolved: Resolved) -> NarInfo:
        info = resolved.info
        compressed = self.compressed_copy(info)
        narhash = nix32_encode(info.nar_hash)
        if compressed is not None:
            location = NarLocation(
                f"nar/{narhash}.nar.zst?hash={resolved.hash_part}",
                "zstd",
                compressed.file_hash,
                compressed.file_size,
            )
        else:
            location = NarLocation(f"nar/{narhash}.nar?hash={resolved.hash_part}", "none")
            self.schedule_compression(info)
        key = (
            info.path,
            info.nar_hash,
            info.nar_size,
            info.sigs,
            info.references,
            info.deriver,
            info.ca,
            location,
        )
        cached = self.narinfo_cache.get(key)
        if cached is None:
            cached = NarInfo(info, location, signatures(info, self.signers))
            self.narinfo_cache.put(key, cached)
        return cached

    # --- dispatch ---------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        try:
            return await dispatch(self, request)
        except StoreError as exc:
            log.error("store error on %s %s: %s", request.method, request.raw_path, exc)
            resp = error(503, "the store cannot answer right now", [("Retry-After", "5")])
            return resp
