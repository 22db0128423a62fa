"""What a route may use of the application: the context interface routes depend on.

Routes import this module, never `cache.app`; `App` implements the interface and the server
wires it (`App.handle` → `routes.dispatch(app, request)`). Arrows point one way:
transport ← app → routes → context → store/narinfo/compression.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .bodies import BodyMemo
from .compression import CompressedNar, CopyIndex, LiveCopy
from .config import Config
from .metrics import Metrics
from .narinfo import NarInfo, NarLocation, PathInfo
from .push.service import PushService
from .signing import PublicKey
from .store import FsNar, Stamp, Store


@dataclass(frozen=True, slots=True)
class Resolved:
    """A valid store path a client asked for, with its metadata."""

    hash_part: str
    info: PathInfo


@dataclass(slots=True)
class Known:
    """What a worker knows of a valid path, and its rendered answers. Checked on every use with
    one `lstat` of the store path (a collected path is a 404 at once; a path rebuilt under the
    same name has a new inode), and asked of the store again after a short time (a signature
    added since)."""

    resolved: Resolved
    real: bytes  # where the path's files are
    stat_key: tuple[int, int]
    checked: float
    fs: FsNar | None  # the NAR from the files, when this process can read them
    zstd: bool  # offered compressed (decided once: compression on, files readable, compressible)
    location: NarLocation | None = None
    text: bytes | None = None
    json: bytes | None = None
    ahead: bool = False  # fetched ahead of the client: its first use fetches the next level
    stamp: Stamp | None = None  # the database when the metadata was read (None: no database to tell)


class Context(Protocol):
    """The application as the routes see it (first argument of every handler)."""

    @property
    def config(self) -> Config: ...

    @property
    def store(self) -> Store: ...

    @property
    def copies(self) -> CopyIndex | None:
        """What is known of the compressed copies; None when compression is off."""
        ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def bodies(self) -> BodyMemo:
        """Small NAR bodies in memory, by NAR hash and coding ("zstd" or "none")."""
        ...

    @property
    def public_keys(self) -> Sequence[PublicKey]: ...

    @property
    def version(self) -> str: ...

    @property
    def push(self) -> PushService | None:
        """The push service (`/push/…` uploads), None unless `[push] enable = true`."""
        ...

    @property
    def log_dir(self) -> Path:
        """Nix's build-log directory (`…/log/nix/drvs`)."""
        ...

    async def known(self, hash_part: str, *, contents_only: bool = False) -> Known | None:
        """A valid path whose NAR this process can produce, or None (a 404): the hot path.
        `contents_only`: the caller serves the path's contents, not its signatures, so metadata
        remembered for longer than a second will do while the path stays valid."""
        ...

    async def resolve(self, hash_part: str, *, contents_only: bool = False) -> Resolved | None:
        """`known`, for routes that need only the metadata."""
        ...

    def narinfo_body(self, known: Known, as_json: bool) -> bytes:
        """The rendered narinfo (text or `?json`), remembered while it stays the same."""
        ...

    def compressed_copy(self, info: PathInfo) -> CompressedNar | None: ...

    def keep_live_copy(self, nar_hash: bytes) -> LiveCopy | None:
        """A writer that keeps a live stream's bytes as the copy, or None (no copies now)."""
        ...

    def copy_kept(self, nar_hash: bytes) -> None:
        """A live stream's bytes became the copy."""
        ...

    def schedule_compression(self, info: PathInfo, fs: FsNar | None = None) -> None: ...

    def narinfo(self, resolved: Resolved) -> NarInfo:
        """The rendered, signed narinfo of a resolved path (cached)."""
        ...
