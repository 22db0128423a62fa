"""The application: configuration, store, keys and caches, and the dispatch of requests to routes.

`App` implements `context.Context`, the interface the routes are written against.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Hashable
from pathlib import Path
from typing import Generic, TypeVar

import trio

from . import __version__
from .bodies import BodyMemo
from .compression import (
    MIN_COMPRESS_SIZE,
    CompressedNar,
    CopyIndex,
    CopyStore,
    LiveCopy,
    compressed_in_memory,
    has_copy,
    nar_in_memory,
)
from .compressor import Compressor
from .config import Config
from .context import Known, Resolved
from .daemon import DaemonStore
from .hashes import nix32_encode
from .metrics import Metrics
from .nar import read_small_file
from .narinfo import NarInfo, NarLocation, PathInfo, signatures
from .push.service import PushService
from .routes import dispatch
from .signing import PublicKey, Signer
from .store import DbStore, FsNar, Stamp, Store, StoreError
from .storepath import hash_part_of
from .transport.messages import Request, Response, error

log = logging.getLogger("harmonia.app")


METADATA_TTL = 1.0
KNOWN_ENTRIES = 16384
# references fetched ahead of the client walking a closure: levels, per path, at once, queued
PREFETCH_DEPTH = 3
PREFETCH_FANOUT = 64
PREFETCH_VISITS = 512  # references looked at per answer, at most
PREFETCH_PARALLEL = 2
PREFETCH_QUEUE = 1024
PREFETCH_WAIT = 2.0
PREFETCH_YIELD = 0.002  # the longest a look-ahead step waits for answers in progress
NEW_PATHS_POLL = 1.0
# a new path's narinfo is rendered, and its small NAR read, this long after it was registered:
# by then the worker that compresses new paths has made its copy (FileHash/FileSize known)
WARM_RENDER_DELAY = 2.0
REGISTRY_RETRY = 30.0
# after a commit, the newest this many registrations are checked again in one query: the paths a
# client is about to fetch stay current while the build goes on registering others
RESTAMP_ROWS = 4096


def stat_key(real: bytes) -> tuple[int, int] | None:
    try:
        st = os.lstat(real)
    except OSError:
        return None
    return st.st_ino, st.st_ctime_ns


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Recent(Generic[K, V]):
    """The most recently used `entries` values by key. Used for rendered narinfos and their
    signatures: signing costs real microseconds and rarely changes; a key includes everything
    its value depends on, so a new signature or a new location renders anew."""

    def __init__(self, entries: int) -> None:
        self._entries = entries
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
        return found

    def put(self, key: K, value: V) -> None:
        if self._entries <= 0:
            return
        self._items[key] = value
        if len(self._items) > self._entries:
            self._items.popitem(last=False)


class CompressionTurn:
    """One worker at a time compresses new paths: whoever holds an exclusive lock on a file in the
    state directory. The others try again every few seconds (and take over if it goes)."""

    RETRY = 10.0

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._tried = float("-inf")

    def held(self) -> bool:
        if self._fd is not None:
            return True
        now = time.monotonic()
        if now - self._tried < self.RETRY:
            return False
        self._tried = now
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            log.info("not compressing new store paths: %s: %s", self.path, exc.strerror)
            self._tried = float("inf")
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


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
        self.narinfo_cache: Recent[tuple[object, ...], NarInfo] = Recent(config.narinfo_cache_entries)
        # a narinfo's signatures do not depend on its location: a copy made since renders anew
        # without signing again
        self.signature_cache: Recent[tuple[object, ...], tuple[str, ...]] = Recent(
            config.narinfo_cache_entries
        )
        self.bodies = BodyMemo()
        self.started = time.time()
        self.version = __version__
        self.copies: CopyIndex | None = None
        self.compressor: Compressor | None = None
        if config.enable_compression:
            copy_store = CopyStore(
                default_state_directory(config) / "nar-zstd",
                config.zstd_level,
                config.compressed_cache_max_bytes,
            )
            self.copies = CopyIndex(copy_store)
            self.compressor = Compressor(copy_store, self.copies, self.metrics, self._copy_made)
        self._known: dict[str, Known] = {}
        self._prefetch: trio.MemorySendChannel[tuple[str, str, int]] | None = None
        self._prefetching: dict[str, trio.Event] = {}
        self._quiet: trio.Event | None = None
        self._awaiting_ahead = 0  # requests waiting for a look-ahead to arrive
        # Nix's database where this process can read it and it is the store's (see
        # `_open_registry`): it tells new paths and whether any metadata changed
        self._registry: DbStore | None = self.store if isinstance(self.store, DbStore) else None
        self._registry_complained = False
        self._registry_refused = False  # the database is not the daemon's store's
        # about 2 KiB an entry (metadata and the rendered answers): at most ~32 MiB a worker
        self._known_entries = max(1024, min(config.narinfo_cache_entries, KNOWN_ENTRIES))
        # <state>/nix/db/db.sqlite beside <state>/log/nix/drvs, as Nix lays them out
        parents = config.nix_db_path.parents
        self.log_dir = (parents[2] if len(parents) > 2 else Path("/nix/var")) / "log" / "nix" / "drvs"
        self.push: PushService | None = None
        if config.push.enable:
            self.push = PushService(
                config.push, default_state_directory(config), config.daemon_socket, config.virtual_nix_store
            )

    async def run_background(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hosts background work (the compressor, the watch for new paths) for the worker's life.
        Nothing in here may end the worker: every job's failure is logged and survived."""
        async with trio.open_nursery() as nursery:
            if self.push is not None:
                await nursery.start(self.push.run_sweeps)
            send, receive = trio.open_memory_channel[tuple[str, str, int]](PREFETCH_QUEUE)
            self._prefetch = send
            nursery.start_soon(self._run_prefetch, receive)
            if self.compressor is not None:
                await nursery.start(self.compressor.run)
            nursery.start_soon(self._watch_new_paths)
            task_status.started()
            await trio.sleep_forever()

    async def aclose(self) -> None:
        await self.store.aclose()

    def _copy_made(self, nar_hash: bytes) -> None:
        """A copy was made: its narinfo gains FileHash/FileSize on the next request (`narinfo_body`
        looks for the meta the index just forgot)."""

    async def _watch_new_paths(self) -> None:
        """New paths as Nix registers them (the database numbers them in order). Every worker
        learns their metadata and signs their narinfos before any client asks (a fleet host
        mostly fetches what was just built); one worker at a time also compresses them (a lock in
        the state directory), so the first client already gets the copy. Where the database
        cannot be read (a daemon-only service), paths are learnt and compressed when first asked
        for instead."""
        while (registry := await self._open_registry()) is None:
            if self._registry_refused:
                return
            await trio.sleep(REGISTRY_RETRY)  # the daemon may not be up yet, or the database not readable
        try:
            last = registry.last_path_id()
        except StoreError as exc:
            log.info("not watching for new store paths (%s): paths are learnt when first asked for", exc)
            return
        turn = (
            CompressionTurn(self.compressor.copies.dir.parent / "new-paths.lock") if self.compressor else None
        )
        rendering: deque[tuple[float, list[Known]]] = deque()
        first, seen = last + 1, registry.stamp()
        try:
            while True:
                await trio.sleep(NEW_PATHS_POLL)
                while rendering and rendering[0][0] <= time.monotonic():
                    await self._finish_warming(rendering.popleft()[1])
                now = registry.stamp()  # before anything is read
                if now is not None and seen is not None and now.generation != seen.generation:
                    await self._restamp(registry, now, max(first, last - RESTAMP_ROWS))
                seen = now
                try:
                    rows = registry.paths_after(last)
                except StoreError as exc:
                    log.info("watching for new store paths failed: %s", exc)
                    continue
                if not rows:
                    continue
                last = rows[-1][0]  # in id order
                if turn is not None and turn.held():
                    self._compress_new(rows, registry)
                warmed = await self._warm(rows, registry)
                if warmed:
                    rendering.append((time.monotonic() + WARM_RENDER_DELAY, warmed))
        finally:
            if turn is not None:
                turn.release()

    async def _open_registry(self) -> DbStore | None:
        """The database, for the daemon backend too where it is readable: but only once it agrees
        with the daemon on a path (a daemon_socket serving another store than nix_db_path's must
        not have its answers taken from the wrong database)."""
        if self._registry is not None:
            return self._registry
        if not isinstance(self.store, DaemonStore):
            self._registry_refused = True
            return None
        db = DbStore(self.config.nix_db_path, self.config.virtual_nix_store, self.config.real_nix_store)
        try:
            newest = db.rows_from(db.last_path_id(), 1)
            ours = await db.path_info(newest[0][0]) if newest else None
            daemons = await self.store.path_info(ours.path) if ours is not None else None
        except StoreError as exc:
            if not self._registry_complained:
                self._registry_complained = True
                log.info(
                    "not watching for new store paths yet (%s): paths are learnt when first asked for", exc
                )
            await db.aclose()
            return None
        if ours is None:
            await db.aclose()
            return None  # an empty database: nothing to check the daemon against yet
        if daemons is None or daemons.nar_hash != ours.nar_hash:
            self._registry_refused = True
            log.warning(
                "nix_db_path %s does not describe the store of daemon_socket %s: new paths are "
                "learnt when first asked for",
                self.config.nix_db_path,
                self.config.daemon_socket,
            )
            await db.aclose()
            return None
        self._registry = db
        return db

    def _compress_new(self, rows: list[tuple[int, str, bytes, int]], registry: DbStore) -> None:
        assert self.compressor is not None
        for _row_id, path, nar_hash, nar_size in rows:
            # within the copy budget: a NAR larger than all of it would only evict the rest.
            # Derivations are registered with every build but rarely fetched: a copy of one is
            # made when it is first asked for (as many copies made, and fsynced, as outputs).
            # Small NARs get none: workers compress them in memory
            if (
                has_copy(nar_size)
                and nar_size <= self.config.compressed_cache_max_bytes
                and not path.endswith(".drv")
            ):
                self.compressor.submit(nar_hash, registry.real_path(path), nar_size)

    async def _warm(self, rows: list[tuple[int, str, bytes, int]], registry: DbStore) -> list[Known]:
        """New paths' metadata, remembered as if fetched ahead (their first use looks ahead to their
        references), between requests."""
        warmed: list[Known] = []
        for _row_id, path, _nar_hash, _nar_size in rows:
            hash_part = hash_part_of(path)
            if path.endswith(".drv") or hash_part in self._known or hash_part in self._prefetching:
                continue
            await trio.lowlevel.checkpoint()
            await self._until_quiet()
            self.metrics.store_lookup("registration")
            try:
                info, stamp = await registry.stamped_path_info(path)
            except StoreError:
                break  # only a head start: the requests ask the store themselves
            if info is None or hash_part in self._known or not self.store.servable(info):
                continue
            entry = self._remember(hash_part, info, stamp=stamp)
            entry.ahead = True
            warmed.append(entry)
        return warmed

    async def _restamp(self, registry: DbStore, now: Stamp, first: int) -> None:
        """Entries of paths registered lately whose rows are unchanged are vouched for as of `now`
        (one query for all of them, rather than one per request after the next commit)."""
        try:
            rows = registry.rows_from(first, RESTAMP_ROWS)
        except StoreError:
            return
        for n, (path, row) in enumerate(rows):
            if n % 256 == 255:
                await trio.lowlevel.checkpoint()
                await self._until_quiet()
            entry = self._known.get(hash_part_of(path))
            if (
                entry is not None
                and entry.stamp is not None
                and entry.stamp.row == row
                and entry.resolved.info.path == path
            ):
                entry.stamp = Stamp(now.generation, row)

    async def _finish_warming(self, entries: list[Known]) -> None:
        """Paths learnt a moment ago: their narinfos signed and rendered, their small NARs read.
        A path still waiting for its copy is only signed: rendering it now would have this worker
        compress it too (the narinfo of a copy not made yet asks for one), and the copy's
        FileHash/FileSize would change the text anyway. A small one has no copy to wait for: its
        compressed body is made here."""
        for entry in entries:
            if self._known.get(entry.resolved.hash_part) is not entry:
                continue
            await trio.lowlevel.checkpoint()
            await self._until_quiet()
            if self._known.get(entry.resolved.hash_part) is not entry:
                continue
            info = entry.resolved.info
            if (
                entry.zstd
                and self.copies is not None
                and has_copy(info.nar_size)
                and self.copies.meta(info.nar_hash) is None
            ):
                self._signatures(info)
                continue
            self.narinfo_body(entry, as_json=False)
            self._preload_body(entry)

    def _stamp(self, path: str | None = None) -> Stamp | None:
        """Taken before the store is asked: a commit in between only means asking again later."""
        return None if self._registry is None else self._registry.stamp(path)

    def _still_current(self, entry: Known) -> bool:
        """Whether an entry's metadata may be served without asking the store again: checked
        within METADATA_TTL, or the database says nothing concerning it was committed since (a
        signature added, the path deleted or registered anew all commit). Paths registered just
        now are then served from what this worker learnt as they were registered, while the
        build goes on committing others."""
        now = time.monotonic()
        if now - entry.checked < METADATA_TTL:
            return True
        if entry.stamp is None or self._registry is None:
            return False
        stamp = self._registry.unchanged(entry.stamp, entry.resolved.info.path)
        if stamp is None:
            return False
        entry.stamp, entry.checked = stamp, now
        return True

    # --- lookups shared by the routes -------------------------------------------------

    async def known(self, hash_part: str, *, contents_only: bool = False) -> Known | None:
        """The hot path: a valid path this process can produce the NAR of, or None (a 404).

        Its metadata is asked of the store again after METADATA_TTL (a signature added since),
        except for `contents_only` requests (NARs, listings, files), which serve what cannot
        change while the path stays valid: for them the `lstat` check is enough. A large closure
        fetches its NARs seconds after its narinfos, and each would otherwise cost store queries
        (two daemon round trips) in the request path."""
        entry = self._known.get(hash_part)
        if entry is not None:
            key = stat_key(entry.real)
            if key == entry.stat_key and (contents_only or self._still_current(entry)):
                if entry.ahead:
                    entry.ahead = False
                    self._prefetch_references(entry.resolved.info, PREFETCH_DEPTH)
                return entry
        if entry is None and (ahead := self._prefetching.get(hash_part)) is not None:
            # on its way: wait for it rather than ask the store a second time (and let the
            # look-ahead run now: this request waits for it, it is not delaying an answer)
            self._awaiting_ahead += 1
            try:
                self._check_quiet()
                with trio.move_on_after(PREFETCH_WAIT):
                    await ahead.wait()
            finally:
                self._awaiting_ahead -= 1
            if (found := self._known.get(hash_part)) is not None:
                found.ahead = False
                self._prefetch_references(found.resolved.info, PREFETCH_DEPTH)
                return found
        stamp = self._stamp(entry.resolved.info.path if entry is not None else None)
        self.metrics.store_lookup("request")
        info = await self.store.info_from_hash_part(hash_part)
        if info is None or not self.store.servable(info):
            self._known.pop(hash_part, None)
            return None
        if entry is None:
            self._prefetch_references(info, PREFETCH_DEPTH)
        return self._remember(hash_part, info, entry, stamp)

    def _remember(
        self,
        hash_part: str,
        info: PathInfo,
        entry: Known | None = None,
        stamp: Stamp | None = None,
    ) -> Known:
        real = self.store.real_path(info.path)
        key = stat_key(real)
        if entry is not None and key == entry.stat_key and entry.resolved.info == info:
            entry.checked = time.monotonic()
            entry.stamp = stamp
            return entry
        fs = self.store.fs_nar(info)
        zstd = (
            self.copies is not None
            and fs is not None
            and info.nar_size >= MIN_COMPRESS_SIZE
            # a copy made (by the watch for new paths, say) settles it without reading a sample;
            # a small NAR is never sampled (nor has a copy to look for)
            and (
                not has_copy(info.nar_size)
                or self.copies.meta(info.nar_hash) is not None
                or self.copies.compressible(info.nar_hash, info.nar_size, fs.segments)
            )
        )
        fresh = Known(Resolved(hash_part, info), real, key or (0, 0), time.monotonic(), fs, zstd, stamp=stamp)
        if key is None:
            return fresh  # nothing to check it by: not remembered
        if len(self._known) >= self._known_entries:
            self._known.clear()
        self._known[hash_part] = fresh
        return fresh

    def _prefetch_references(self, info: PathInfo, depth: int) -> None:
        """A client that asked for a path asks for its references next (it walks the closure, one
        level at a time): their metadata is fetched ahead, so those narinfos are answered from
        memory. Best effort: a full queue drops the hint."""
        if self._prefetch is None:
            return
        # through the references fetched ahead and not yet asked for, down to `depth` levels: the
        # frontier moves one level deeper with each answer instead of stalling when it is reached
        budget = PREFETCH_VISITS
        level = [info]
        while level and depth > 0:
            below: list[PathInfo] = []
            for parent in level:
                for ref in parent.references[:PREFETCH_FANOUT]:
                    if ref == parent.path:
                        continue
                    budget -= 1
                    if budget < 0:
                        return
                    ref_hash = hash_part_of(ref)
                    if ref_hash in self._prefetching:
                        continue
                    if (known := self._known.get(ref_hash)) is not None:
                        if known.ahead:
                            below.append(known.resolved.info)
                        continue
                    try:
                        self._prefetch.send_nowait((ref_hash, ref, depth))
                    except trio.WouldBlock:
                        return
                    self._prefetching[ref_hash] = trio.Event()
            level, depth = below, depth - 1

    async def _until_quiet(self) -> None:
        """Until no request of this process is open (at most PREFETCH_YIELD): trio may run a woken
        task before another, so without this a look-ahead could run before the answer that asked
        for it went out, and delay it."""
        if not self._answering():
            return
        quiet = self._quiet
        if quiet is None or quiet.is_set():
            quiet = self._quiet = trio.Event()
            self.metrics.on_quiet = self._check_quiet
        with trio.move_on_after(PREFETCH_YIELD):
            await quiet.wait()

    def _answering(self) -> bool:
        """Whether a request is being answered (not waiting for the look-ahead itself)."""
        return self.metrics.exchanges_open > self._awaiting_ahead

    def _check_quiet(self) -> None:
        if self._quiet is not None and not self._answering():
            self._quiet.set()
            self.metrics.on_quiet = None

    async def _run_prefetch(self, receive: trio.MemoryReceiveChannel[tuple[str, str, int]]) -> None:
        async def one(hash_part: str, path: str, depth: int) -> None:
            try:
                await self._until_quiet()
                if hash_part in self._known:
                    return
                self.metrics.store_lookup("look_ahead")
                # a hint: from the database where it is readable and the store's (the daemon then
                # is not woken on the client's cores for every reference), else from the store
                stamp: Stamp | None = None
                if self._registry is not None:
                    info, stamp = await self._registry.stamped_path_info(path)
                else:
                    info = await self.store.path_info(path)
                if info is not None and self.store.servable(info) and hash_part not in self._known:
                    entry = self._remember(hash_part, info, stamp=stamp)
                    entry.ahead = True
                    self._prefetch_references(info, depth - 1)
                    # rendered and signed now, while the client is busy with the answer before
                    await self._until_quiet()
                    if self._known.get(hash_part) is entry:
                        self.narinfo_body(entry, as_json=False)
                    # and its NAR, when small: the client asks for it once it has the narinfos
                    await self._until_quiet()
                    if self._known.get(hash_part) is entry:
                        self._preload_body(entry)
            except StoreError:
                pass  # only a hint: the request itself asks again
            finally:
                done = self._prefetching.pop(hash_part, None)
                if done is not None:
                    done.set()

        async with trio.open_nursery() as nursery:
            limit = trio.CapacityLimiter(PREFETCH_PARALLEL)
            async for hash_part, path, depth in receive:

                async def limited(h: str = hash_part, p: str = path, d: int = depth) -> None:
                    async with limit:
                        await one(h, p, d)

                nursery.start_soon(limited)

    def _preload_body(self, known: Known) -> None:
        """The small NAR body of a path fetched ahead, read now: a client asks for a closure's
        NARs once it has the narinfos. Offered compressed: compressed here (small) or its copy;
        else the NAR."""
        info = known.resolved.info
        if known.zstd:
            if self.copies is None or self.bodies.get(info.nar_hash, "zstd") is not None:
                return
            if not has_copy(info.nar_size):
                if known.fs is not None and (
                    body := compressed_in_memory(known.fs.segments, self.config.zstd_level)
                ):
                    self.bodies.put(info.nar_hash, "zstd", body)
                return
            meta = self.copies.meta(info.nar_hash)
            if meta is None or meta.file_size > self.bodies.item_max:
                return  # no copy yet: the NAR route compresses it (small) or streams it
            body = read_small_file(os.fsencode(self.copies.copies.data_file(info.nar_hash)), meta.file_size)
            if body is not None:
                self.bodies.put(info.nar_hash, "zstd", body)
        elif known.fs is not None and info.nar_size <= self.bodies.item_max:
            if self.bodies.get(info.nar_hash, "none") is not None:
                return
            if (body := nar_in_memory(known.fs.segments, info.nar_size)) is not None:
                self.bodies.put(info.nar_hash, "none", body)

    async def resolve(self, hash_part: str, *, contents_only: bool = False) -> Resolved | None:
        known = await self.known(hash_part, contents_only=contents_only)
        return None if known is None else known.resolved

    def keep_live_copy(self, nar_hash: bytes) -> LiveCopy | None:
        if self.copies is None or self.compressor is None or self.compressor.refusing():
            return None
        keep = LiveCopy(self.copies.copies, nar_hash)
        return None if keep.failed else keep

    def copy_kept(self, nar_hash: bytes) -> None:
        if self.copies is not None:
            self.copies.forget(nar_hash)
        self._copy_made(nar_hash)
        self.metrics.copy_made()

    def compressed_copy(self, info: PathInfo) -> CompressedNar | None:
        if self.copies is None:
            return None
        return self.copies.copy(info.nar_hash)

    def schedule_compression(self, info: PathInfo, fs: FsNar | None = None) -> None:
        if self.compressor is None or not has_copy(info.nar_size):
            return
        nar = fs if fs is not None else self.store.fs_nar(info)
        if nar is not None:
            self.compressor.submit(info.nar_hash, nar.root, info.nar_size)

    def location(self, known: Known) -> NarLocation:
        """Where the narinfo sends the client. A compressible path is offered compressed from the
        first answer (the URL never changes); FileHash/FileSize are added once a copy was made."""
        resolved = known.resolved
        narhash = nix32_encode(resolved.info.nar_hash)
        if not known.zstd or self.copies is None:
            return NarLocation(f"nar/{narhash}.nar?hash={resolved.hash_part}", "none")
        url = f"nar/{narhash}.nar.zst?hash={resolved.hash_part}"
        if not has_copy(resolved.info.nar_size):
            # compressed in memory when asked for: the same bytes whichever worker answers, and
            # those of a copy an earlier version made, so a cached narinfo with its FileHash holds
            return NarLocation(url, "zstd")
        meta = self.copies.meta(resolved.info.nar_hash)
        if meta is None:
            self.schedule_compression(resolved.info, known.fs)
            return NarLocation(url, "zstd")
        return NarLocation(url, "zstd", meta.file_hash, meta.file_size)

    def narinfo(self, resolved: Resolved, location: NarLocation | None = None) -> NarInfo:
        info = resolved.info
        if location is None:
            known = self._known.get(resolved.hash_part)
            if known is None or known.resolved != resolved:
                fs = self.store.fs_nar(info)
                zstd = (
                    self.copies is not None
                    and fs is not None
                    and self.copies.compressible(info.nar_hash, info.nar_size, fs.segments)
                )
                known = Known(resolved, self.store.real_path(info.path), (0, 0), 0.0, fs, zstd)
            location = self.location(known)
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
            cached = NarInfo(info, location, self._signatures(info))
            self.narinfo_cache.put(key, cached)
        return cached

    def _signatures(self, info: PathInfo) -> tuple[str, ...]:
        # what they depend on: the fingerprint, and the store's own signatures
        key = (info.path, info.nar_hash, info.nar_size, info.sigs, info.references)
        signed = self.signature_cache.get(key)
        if signed is None:
            signed = signatures(info, self.signers)
            self.signature_cache.put(key, signed)
        return signed

    def _copy_known(self, known: Known) -> bool:
        return (
            known.zstd
            and has_copy(known.resolved.info.nar_size)
            and self.copies is not None
            and self.copies.meta(known.resolved.info.nar_hash) is not None
        )

    def narinfo_body(self, known: Known, as_json: bool) -> bytes:
        """The rendered answer, remembered with the entry while its location stays the same."""
        location = known.location
        # a location changes only when a copy's FileHash/FileSize become known
        if location is None or (location.file_hash is None and self._copy_known(known)):
            location = self.location(known)
            if location != known.location:
                known.location, known.text, known.json = location, None, None
        elif location.compression == "zstd" and location.file_hash is None:
            self.schedule_compression(known.resolved.info, known.fs)
        if as_json:
            if known.json is None:
                known.json = self.narinfo(known.resolved, location).to_json().encode()
            return known.json
        if known.text is None:
            known.text = self.narinfo(known.resolved, location).render().encode()
        return known.text

    # --- dispatch ---------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        try:
            return await dispatch(self, request)
        except StoreError as exc:
            log.error("store error on %s %s: %s", request.method, request.raw_path, exc)
            resp = error(503, "the store cannot answer right now", [("Retry-After", "5")])
            return resp
