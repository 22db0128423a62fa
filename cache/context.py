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

from .compression import CompressedNar, ZstdCache
from .config import Config
from .metrics import Metrics
from .narinfo import NarInfo, PathInfo
from .push.service import PushService
from .signing import PublicKey
from .store import Store


@dataclass(frozen=True, slots=True)
class Resolved:
    """A valid store path a client asked for, with its metadata."""

    hash_part: str
    info: PathInfo


class Context(Protocol):
    """The application as the routes see it (first argument of every handler)."""

    @property
    def config(self) -> Config: ...

    @property
    def store(self) -> Store: ...

    @property
    def zstd(self) -> ZstdCache | None:
        """The compressed-copy cache, None when compression is off or its directory is unusable."""
        ...

    @property
    def metrics(self) -> Metrics: ...

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

    async def resolve(self, hash_part: str) -> Resolved | None:
        """A valid path whose NAR this process can produce, or None (a 404)."""
        ...

    def compressed_copy(self, info: PathInfo) -> CompressedNar | None: ...

    def schedule_compression(self, info: PathInfo) -> None: ...

    def narinfo(self, resolved: Resolved) -> NarInfo:
        """The rendered, signed narinfo of a resolved path (cached)."""
        ...
