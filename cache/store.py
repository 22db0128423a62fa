"""Store access behind one interface, and the default backend: Nix's SQLite database, read-only.

The database answers metadata (valid paths, hashes, references, signatures); contents come from
the filesystem under `real_nix_store`, which may differ from the logical `virtual_nix_store`
(a store mounted elsewhere, as harmonia allows).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .hashes import HashFormatError, parse_sha256
from .nar import Segment, nar_segments
from .narinfo import PathInfo

log = logging.getLogger("harmonia.store")


class StoreError(Exception):
    """The store cannot answer (database unreadable, daemon gone): a server-side fault."""


@dataclass(frozen=True, slots=True)
class FsNar:
    """The NAR of a path made from the filesystem, segment by segment."""

    root: bytes
    size: int

    def segments(self) -> Iterator[Segment]:
        return nar_segments(self.root)


@dataclass(frozen=True, slots=True)
class StreamedNar:
    """The NAR of a path as an async byte stream (from the daemon)."""

    size: int
    open: Callable[[], AsyncIterator[bytes]]


class Store(Protocol):
    store_dir: str

    async def path_from_hash_part(self, hash_part: str) -> str | None: ...

    async def path_info(self, path: str) -> PathInfo | None: ...

    async def info_from_hash_part(self, hash_part: str) -> PathInfo | None:
        """The hot path: a client's hash part to the path's metadata, None when not valid."""
        ...

    def servable(self, info: PathInfo) -> bool:
        """Whether this process can produce the NAR of a path the store lists as valid."""
        ...

    def fs_nar(self, info: PathInfo) -> FsNar | None:
        """The NAR made from the files, when this process can read them (sendfile, copies)."""
        ...

    def real_path(self, path: str) -> bytes: ...

    async def nar(self, info: PathInfo) -> FsNar | StreamedNar: ...

    async def aclose(self) -> None: ...


def real_path(path: str, virtual: str, real: str) -> bytes:
    """Map a logical store path to where its contents are on this machine."""
    if virtual != real and path.startswith(virtual + "/"):
        path = real + path[len(virtual) :]
    return os.fsencode(path)


def _parse_db_hash(text: str) -> bytes:
    try:
        return parse_sha256(text)
    except HashFormatError as exc:
        raise StoreError(f"the database holds a hash Nix would not write: {text!r}") from exc


GENERATION_REUSE = 0.05  # how long one reading of the database's generation is trusted


@dataclass(frozen=True, slots=True)
class Stamp:
    """What the database was when metadata was read: its generation, and the path's row (None:
    not read). Nix commits every registration, signature and deletion."""

    generation: tuple[int, int]
    row: tuple[object, ...] | None


class DbStore:
    """Reads Nix's database directly: fast (microseconds a query), no daemon round trip.

    Opened read-only with a busy timeout; WAL mode lets us see Nix's commits while it writes.
    One connection per worker process, created lazily and kept.
    """

    def __init__(self, db_path: Path, store_dir: str, real_store_dir: str) -> None:
        self.db_path = db_path
        self.store_dir = store_dir
        self.real_store_dir = real_store_dir
        self._conn: sqlite3.Connection | None = None
        self._opened = 0  # connections opened so far: a generation names its connection
        self._generation: tuple[float, tuple[int, int]] | None = None  # (when read, what)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                conn = sqlite3.connect(
                    f"file:{self.db_path}?mode=ro",
                    uri=True,
                    check_same_thread=False,
                    isolation_level=None,
                )
                conn.execute("PRAGMA busy_timeout = 2000")
                conn.execute("PRAGMA query_only = 1")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open the Nix database {self.db_path}: {exc}") from exc
            self._conn = conn
            self._opened += 1
        return self._conn

    def generation(self) -> tuple[int, int]:
        """Changes whenever another connection (Nix registering, signing or deleting a path)
        commits to the database, read at most every GENERATION_REUSE seconds. SQLite's
        `data_version` counts per connection, so a reopened one is a new generation."""
        now = time.monotonic()
        if self._generation is not None and now - self._generation[0] <= GENERATION_REUSE:
            return self._generation[1]
        rows = self._query("PRAGMA data_version", ())
        version = rows[0][0] if rows else None
        if not isinstance(version, int):
            raise StoreError(f"the Nix database {self.db_path} reported no data_version")
        self._generation = (now, (self._opened, version))
        return self._generation[1]

    # every column Nix updates in place (registering a path anew gives it a new id)
    _ROW = "SELECT id, hash, narSize, sigs, ca"

    def _row(self, path: str) -> tuple[object, ...] | None:
        rows = self._query(f"{self._ROW} FROM ValidPaths WHERE path = ?", (path,))
        return rows[0] if rows else None

    async def stamped_path_info(self, path: str) -> tuple[PathInfo | None, Stamp]:
        """`path_info` and its stamp from the same query (the generation read before it)."""
        generation = self.generation()
        rows = self._query(f"{self._COLUMNS} WHERE path = ?", (path,))
        if not rows:
            return None, Stamp(generation, None)
        row = rows[0]
        # _COLUMNS' id, hash, narSize, sigs and ca: the row as `_row` reads it
        return self._info(row), Stamp(generation, (row[0], row[2], row[5], row[6], row[7]))

    def rows_from(self, first: int, limit: int) -> list[tuple[str, tuple[object, ...]]]:
        """Paths from row `first` on, each with its row as `stamp` reads it."""
        rows = self._query(
            f"{self._ROW}, path FROM ValidPaths WHERE id >= ? ORDER BY id LIMIT ?", (first, limit)
        )
        return [(str(row[5]), row[:5]) for row in rows]

    def stamp(self, path: str | None = None) -> Stamp | None:
        """Taken before reading metadata (of `path`, when known), to tell later whether it is still
        current without reading it again."""
        try:
            return Stamp(self.generation(), None if path is None else self._row(path))
        except StoreError:
            return None

    def unchanged(self, stamp: Stamp, path: str) -> Stamp | None:
        """A newer stamp when nothing concerning `path` was committed since `stamp` was taken: the
        database is as it was, or the path's row is (other paths registered since, say)."""
        try:
            generation = self.generation()
            if generation == stamp.generation:
                return stamp
            if stamp.row is None:
                return None
            row = self._row(path)
        except StoreError:
            return None
        return Stamp(generation, row) if row == stamp.row else None

    def _query(self, sql: str, args: tuple[object, ...]) -> list[tuple[object, ...]]:
        try:
            return self._db().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            # a broken connection is not kept: the next request reopens
            self._conn = None
            raise StoreError(f"Nix database query failed: {exc}") from exc

    async def path_from_hash_part(self, hash_part: str) -> str | None:
        prefix = f"{self.store_dir}/{hash_part}"
        rows = self._query("SELECT path FROM ValidPaths WHERE path >= ? ORDER BY path LIMIT 1", (prefix,))
        if rows and isinstance(rows[0][0], str) and rows[0][0].startswith(prefix + "-"):
            return rows[0][0]
        return None

    _COLUMNS = "SELECT id, path, hash, registrationTime, deriver, narSize, sigs, ca FROM ValidPaths"

    async def path_info(self, path: str) -> PathInfo | None:
        rows = self._query(f"{self._COLUMNS} WHERE path = ?", (path,))
        return self._info(rows[0]) if rows else None

    async def info_from_hash_part(self, hash_part: str) -> PathInfo | None:
        """One query instead of two on the hot path: hash part to full metadata."""
        prefix = f"{self.store_dir}/{hash_part}"
        rows = self._query(f"{self._COLUMNS} WHERE path >= ? ORDER BY path LIMIT 1", (prefix,))
        if rows and isinstance(rows[0][1], str) and rows[0][1].startswith(prefix + "-"):
            return self._info(rows[0])
        return None

    def last_path_id(self) -> int:
        rows = self._query("SELECT max(id) FROM ValidPaths", ())
        top = rows[0][0] if rows else None
        return top if isinstance(top, int) else 0

    def paths_after(self, after: int, limit: int = 500) -> list[tuple[int, str, bytes, int]]:
        """Paths registered since row `after` (ids only grow): id, path, NAR hash, NAR size."""
        rows = self._query(
            "SELECT id, path, hash, narSize FROM ValidPaths WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
        )
        return [
            (int(row_id), str(path), _parse_db_hash(str(nar_hash)), int(nar_size or 0))  # type: ignore[call-overload]
            for row_id, path, nar_hash, nar_size in rows
        ]

    def _info(self, row: tuple[object, ...]) -> PathInfo:
        row_id, path, nar_hash, reg_time, deriver, nar_size, sigs, ca = row
        refs = self._query(
            "SELECT v.path FROM Refs r JOIN ValidPaths v ON r.reference = v.id WHERE r.referrer = ?",
            (row_id,),
        )
        return PathInfo(
            path=str(path),
            nar_hash=_parse_db_hash(str(nar_hash)),
            nar_size=int(nar_size or 0),  # type: ignore[call-overload]
            references=tuple(sorted(str(r[0]) for r in refs)),
            deriver=str(deriver) if deriver else None,
            sigs=tuple(str(sigs).split()) if sigs else (),
            ca=str(ca) if ca else None,
            registration_time=int(reg_time or 0),  # type: ignore[call-overload]
        )

    def real_path(self, path: str) -> bytes:
        return real_path(path, self.store_dir, self.real_store_dir)

    def servable(self, info: PathInfo) -> bool:
        """The database may list a path whose files this process cannot see or read."""
        real = self.real_path(info.path)
        try:
            os.lstat(real)
        except FileNotFoundError:
            log.warning("%s is valid in the database but missing on disk", info.path)
            return False
        except PermissionError:
            log.warning(
                "%s is not readable by this process (uid %d): check the service's permissions on the store",
                info.path,
                os.getuid(),
            )
            return False
        if not os.access(real, os.R_OK):
            log.warning("%s is not readable by this process (uid %d)", info.path, os.getuid())
            return False
        return True

    def fs_nar(self, info: PathInfo) -> FsNar:
        return FsNar(self.real_path(info.path), info.nar_size)

    async def nar(self, info: PathInfo) -> FsNar:
        return self.fs_nar(info)

    async def aclose(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
