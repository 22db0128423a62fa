"""The push service: uploads held under the state directory, imports through the nix-daemon.

Per path the protocol is: the NAR first (`PUT nar/<filehash>.nar[.xz|.zst]`, kept decompressed
as `nar/<name>.data` with its hashes in `nar/<name>.json`), then the narinfo, whose PUT checks
the signature, the NAR's hash and size and the references, then imports and roots the path.

On one daemon connection, in this order: temporary roots for the references (they cannot vanish
between the check and the import), the check that they are valid, the retention root (a link
registered with AddIndirectRoot, dangling until the import), then AddToStoreNar.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Protocol

import trio

from ..daemon import ConnectFailed, Connection, DaemonError, DaemonGone, connect
from ..hashes import nix32_encode
from .config import PushConfig, tokens_path
from .narbody import ReceivedNar, receive_nar
from .retention import is_retained, make_root, sweep, sweep_files
from .tokens import TokenStore
from .upload import NarName, UploadedNarInfo, UploadRefused

log = logging.getLogger("harmonia.push")

ABANDONED_UPLOAD_SECONDS = 86400.0
IMPORT_TIMEOUT = 3600.0
IMPORTS_AT_ONCE = 8
DAEMON_DOWN_STATUS = 424  # a 4xx Nix does not retry: 5xx/408/429 make Nix ≤ 2.33.1 hang on a PUT


class BodySource(Protocol):
    """A request body as the transport hands it over (see `cache/http.py`)."""

    length: int | None

    async def receive(self, max_bytes: int = 65536) -> bytes: ...


@dataclass(frozen=True, slots=True)
class PendingNar:
    data: Path
    nar_hash: bytes
    nar_size: int
    file_size: int


class PushService:
    def __init__(
        self, config: PushConfig, state_directory: Path, daemon_socket: Path, store_dir: str
    ) -> None:
        self.config = config
        self.base = state_directory.absolute() / "push"
        self.tmp = self.base / "tmp"
        self.nars = self.base / "nar"
        self.roots = self.base / "roots"
        self.logs = self.base / "log"
        self.daemon_socket = daemon_socket
        self.store_dir = store_dir
        self.tokens = TokenStore(tokens_path(config, state_directory))
        self._locks: dict[str, trio.Lock] = {}
        # the daemon forks a process per connection: parallel uploads (Nix ≥ 2.35) queue here
        self._imports = trio.CapacityLimiter(IMPORTS_AT_ONCE)

    # --- NAR uploads ------------------------------------------------------------------

    def pending(self, name: NarName) -> PendingNar | None:
        meta = self.nars / f"{name.name}.json"
        try:
            doc = json.loads(meta.read_text())
            return PendingNar(
                self.nars / f"{name.name}.data",
                bytes.fromhex(doc["nar_hash"]),
                int(doc["nar_size"]),
                int(doc["file_size"]),
            )
        except (OSError, ValueError, KeyError):
            return None

    async def store_nar(self, name: NarName, body: BodySource) -> ReceivedNar:
        """Receive a NAR body; its sha256 must be the one its name says (else 400)."""
        received = await receive_nar(
            body.receive,
            name.compression,
            self.tmp,
            max_bytes=self.config.max_nar_bytes,
            idle_timeout=self.config.idle_timeout,
            declared_length=body.length,
        )
        try:
            if received.file_hash != name.file_hash:
                raise UploadRefused(
                    400,
                    f"the body's sha256 is {nix32_encode(received.file_hash)}, "
                    f"but its URL names {nix32_encode(name.file_hash)}: the NAR was changed on the way",
                )
            doc = {
                "nar_hash": received.nar_hash.hex(),
                "nar_size": received.nar_size,
                "file_size": received.file_size,
                "received": time.time(),
            }
            await trio.to_thread.run_sync(self._keep, name, received.path, doc)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(received.path)
            raise
        return received

    def _keep(self, name: NarName, data: Path, doc: dict[str, object]) -> None:
        self.nars.mkdir(mode=0o700, parents=True, exist_ok=True)
        # data first, then the record that says it is complete; both atomic renames
        os.replace(data, self.nars / f"{name.name}.data")
        tmp = self.tmp / f"{name.name}.{secrets.token_hex(8)}.json"  # uploads of one NAR may race
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.nars / f"{name.name}.json")

    def _forget(self, name: NarName) -> None:
        for suffix in (".json", ".data"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.nars / f"{name.name}{suffix}")

    # --- narinfo: the import ----------------------------------------------------------

    def retained(self, store_path: str) -> bool:
        return is_retained(self.roots, store_path, self.store_dir, self.config.retention_seconds, time.time())

    async def import_path(self, uploaded: UploadedNarInfo) -> str:
        """Import and root the path; "imported" or "already valid". Raises UploadRefused."""
        info = uploaded.info
        lock = self._locks.setdefault(info.path, trio.Lock())
        try:
            async with lock, self._imports:
                return await self._import_locked(uploaded)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._locks.pop(info.path, None)

    async def _import_locked(self, uploaded: UploadedNarInfo) -> str:
        info = uploaded.info
        try:
            with trio.fail_after(IMPORT_TIMEOUT):
                conn = await connect(self.daemon_socket)
                try:
                    return await self._import_on(conn, uploaded)
                finally:
                    with trio.CancelScope(shield=True):
                        await conn.aclose()
        except UploadRefused:
            raise
        except (
            ConnectFailed,
            DaemonGone,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            OSError,
        ) as exc:
            log.error("import of %s: the nix-daemon is unavailable: %s", info.path, exc)
            raise UploadRefused(
                DAEMON_DOWN_STATUS,
                f"the cache cannot reach its nix-daemon ({exc}); this is not your upload's fault: "
                "push again once the cache's host is healthy",
            ) from exc
        except trio.TooSlowError as exc:
            raise UploadRefused(
                DAEMON_DOWN_STATUS, f"the cache's nix-daemon did not finish importing {info.path} in time"
            ) from exc
        except DaemonError as exc:
            message = str(exc)
            log.warning("import of %s refused by the nix-daemon: %s", info.path, message)
            if "lacks a valid signature" in message:
                raise UploadRefused(
                    DAEMON_DOWN_STATUS,
                    f"the cache's host does not trust the signature of {info.path} ({message}); "
                    "its nix.conf trusted-public-keys must list the keys in [push] trusted_keys",
                ) from exc
            if "hash mismatch" in message or "size mismatch" in message:
                raise UploadRefused(400, f"the nix-daemon refused the NAR of {info.path}: {message}") from exc
            if "is not valid" in message or "reference" in message:
                raise UploadRefused(409, f"the nix-daemon refused {info.path}: {message}") from exc
            raise UploadRefused(
                DAEMON_DOWN_STATUS, f"the cache's nix-daemon refused to import {info.path}: {message}"
            ) from exc

    async def _import_on(self, conn: Connection, uploaded: UploadedNarInfo) -> str:
        info = uploaded.info
        if await conn.query_valid_paths([info.path]):
            await self._root(conn, info.path)
            self._forget(uploaded.nar)
            return "already valid"
        pending = self.pending(uploaded.nar)
        data = _open(pending.data) if pending is not None else None
        if pending is None or data is None:
            # another worker may have imported the same path since the check above
            if await conn.query_valid_paths([info.path]):
                await self._root(conn, info.path)
                return "already valid"
            raise UploadRefused(
                409, f"the NAR nar/{uploaded.nar.name} of {info.path} has not been uploaded (PUT it first)"
            )
        with data:
            return await self._import_pending(conn, uploaded, pending, data)

    async def _import_pending(
        self, conn: Connection, uploaded: UploadedNarInfo, pending: PendingNar, data: BinaryIO
    ) -> str:
        info = uploaded.info
        if pending.nar_hash != info.nar_hash or pending.nar_size != info.nar_size:
            raise UploadRefused(
                400,
                f"the uploaded NAR of {info.path} has NarHash sha256:{nix32_encode(pending.nar_hash)} and "
                f"NarSize {pending.nar_size}, the narinfo says sha256:{nix32_encode(info.nar_hash)} and "
                f"{info.nar_size}: the NAR or the narinfo was tampered with",
            )
        if uploaded.file_size is not None and uploaded.file_size != pending.file_size:
            raise UploadRefused(
                400, f"FileSize {uploaded.file_size} differs from the {pending.file_size} bytes uploaded"
            )
        references = [r for r in info.references if r != info.path]
        for ref in references:
            await conn.add_temp_root(ref)
        valid = await conn.query_valid_paths(references) if references else set()
        missing = [r for r in references if r not in valid]
        if missing:
            raise UploadRefused(
                409,
                f"{info.path} references {', '.join(missing)}, not in the cache's store: "
                "push the references first (nix copy pushes a whole closure)",
            )
        await self._root(conn, info.path)
        await conn.add_to_store_nar(replace(info, registration_time=0), lambda: _file_chunks(data))  # 0: now
        self._forget(uploaded.nar)
        return "imported"

    async def _root(self, conn: Connection, store_path: str) -> None:
        link = await trio.to_thread.run_sync(make_root, self.roots, store_path)
        await conn.add_indirect_root(str(link))

    # --- logs -------------------------------------------------------------------------

    def log_path(self, drv_base: str) -> Path:
        return self.logs / drv_base[:2] / drv_base[2:]

    # --- the sweep --------------------------------------------------------------------

    def sweep_once(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        removed = sweep(self.roots, self.store_dir, self.config.retention_seconds, now)
        for root in removed:
            log.info("retention of %s ended (pushed %s)", root.store_path, time.ctime(root.pushed))
        sweep_files(self.tmp, ABANDONED_UPLOAD_SECONDS, now)
        sweep_files(self.nars, ABANDONED_UPLOAD_SECONDS, now)
        return len(removed)

    async def run_sweeps(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                await trio.to_thread.run_sync(self.sweep_once)
            except OSError as exc:
                log.warning("retention sweep of %s failed: %s", self.roots, exc)
            await trio.sleep(self.config.sweep_interval)


def _open(path: Path) -> BinaryIO | None:
    """The upload, opened: it stays readable if a concurrent import removes its name."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        return None


async def _file_chunks(data: BinaryIO, size: int = 1 << 20) -> AsyncIterator[bytes]:
    while chunk := await trio.to_thread.run_sync(data.read, size):
        yield chunk
