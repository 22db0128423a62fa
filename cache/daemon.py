"""The nix-daemon worker protocol (client side), and a store backend on top of it.

Wire rules (Nix's): numbers are little-endian u64; strings are a length, the bytes, zero padding to
8. After each operation the daemon sends log messages until STDERR_LAST, or STDERR_ERROR. We speak
protocol 1.34 (Nix 2.8) and accept any daemon from 1.21 on.
"""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import trio

from .hashes import HashFormatError, parse_sha256
from .narinfo import PathInfo
from .store import FsNar, StoreError, StreamedNar, real_path

WORKER_MAGIC_1 = 0x6E697863
WORKER_MAGIC_2 = 0x6478696F
CLIENT_VERSION = (1 << 8) | 34
MIN_DAEMON_MINOR = 21

OP_QUERY_PATH_INFO = 26
OP_QUERY_PATH_FROM_HASH_PART = 29
OP_NAR_FROM_PATH = 38

STDERR_NEXT = 0x6F6C6D67
STDERR_READ = 0x64617461
STDERR_WRITE = 0x64617416
STDERR_LAST = 0x616C7473
STDERR_ERROR = 0x63787470
STDERR_START_ACTIVITY = 0x53545254
STDERR_STOP_ACTIVITY = 0x53544F50
STDERR_RESULT = 0x52534C54

MAX_STRING = 64 * 1024 * 1024
T = TypeVar("T")
CONNECT_ATTEMPTS = 5
QUERY_TIMEOUT = 30.0
PATH_NAMES = 200_000


class DaemonError(StoreError):
    """The daemon refused an operation or broke the protocol."""


class DaemonGone(DaemonError):
    """The connection to the daemon closed or broke (a daemon restart, a killed worker)."""


class ConnectFailed(DaemonGone):
    """A new connection failed before its handshake ended (the daemon's backlog was full)."""


def u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def wire_str(data: bytes | str) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return u64(len(raw)) + raw + b"\0" * ((-len(raw)) % 8)


class Connection:
    """One daemon connection with a read buffer. Not safe for concurrent use."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.daemon_version = 0
        self.nix_version = ""

    async def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            data = await self.stream.receive_some(max(65536, n - len(self.buf)))
            if not data:
                raise DaemonGone("the daemon closed the connection")
            self.buf += data

    async def read_exact(self, n: int) -> bytes:
        await self._fill(n)
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_u64(self) -> int:
        return int(struct.unpack("<Q", await self.read_exact(8))[0])

    async def read_bytes(self) -> bytes:
        n = await self.read_u64()
        if n > MAX_STRING:
            raise DaemonError(f"the daemon sent a string of {n} bytes")
        data = await self.read_exact(n + (-n) % 8)
        return data[:n]

    async def read_str(self) -> str:
        return (await self.read_bytes()).decode("utf-8", "surrogateescape")

    async def read_strings(self) -> list[str]:
        return [await self.read_str() for _ in range(await self.read_u64())]

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def handshake(self) -> None:
        await self.send(u64(WORKER_MAGIC_1))
        if await self.read_u64() != WORKER_MAGIC_2:
            raise DaemonError("not a nix-daemon (bad magic)")
        self.daemon_version = await self.read_u64()
        if self.daemon_version >> 8 != 1 or self.daemon_version & 0xFF < MIN_DAEMON_MINOR:
            raise DaemonError(
                f"unsupported daemon protocol {self.daemon_version >> 8}.{self.daemon_version & 0xFF}"
            )
        await self.send(u64(CLIENT_VERSION))
        minor = self.minor
        if minor >= 14:
            await self.send(u64(0))  # no CPU affinity
        if minor >= 11:
            await self.send(u64(0))  # reserveSpace: no
        if minor >= 33:
            self.nix_version = await self.read_str()
        await self.process_stderr()

    @property
    def minor(self) -> int:
        return min(self.daemon_version, CLIENT_VERSION) & 0xFF

    async def process_stderr(self) -> None:
        while True:
            msg = await self.read_u64()
            if msg == STDERR_LAST:
                return
            if msg == STDERR_NEXT:
                await self.read_bytes()
            elif msg == STDERR_ERROR:
                raise DaemonError(await self._read_error())
            elif msg == STDERR_START_ACTIVITY:
                await self.read_u64()  # id
                await self.read_u64()  # level
                await self.read_u64()  # type
                await self.read_bytes()  # text
                await self._read_fields()
                await self.read_u64()  # parent
            elif msg == STDERR_STOP_ACTIVITY:
                await self.read_u64()
            elif msg == STDERR_RESULT:
                await self.read_u64()
                await self.read_u64()
                await self._read_fields()
            elif msg in (STDERR_READ, STDERR_WRITE):
                raise DaemonError("the daemon asked for a data transfer we did not start")
            else:
                raise DaemonError(f"unknown message {msg:#x} from the daemon")

    async def _read_fields(self) -> None:
        for _ in range(await self.read_u64()):
            kind = await self.read_u64()
            if kind == 0:
                await self.read_u64()
            elif kind == 1:
                await self.read_bytes()
            else:
                raise DaemonError(f"unknown log field type {kind}")

    async def _read_error(self) -> str:
        if self.minor >= 26:
            await self.read_str()  # type: "Error"
            await self.read_u64()  # level
            await self.read_str()  # name
            msg = await self.read_str()
            if await self.read_u64():  # havePos
                raise DaemonError("daemon error with a position: unsupported")
            for _ in range(await self.read_u64()):
                if await self.read_u64():
                    raise DaemonError("daemon error trace with a position: unsupported")
                await self.read_str()
            return msg
        msg = await self.read_str()
        await self.read_u64()  # status
        return msg

    async def aclose(self) -> None:
        await self.stream.aclose()


class DaemonStore:
    """Store metadata and NARs through the daemon socket: for a store this process cannot read."""

    def __init__(
        self,
        socket_path: Path,
        store_dir: str,
        real_store_dir: str,
        pool_size: int = 8,
        *,
        prefer_files: bool = True,
    ) -> None:
        self.socket_path = socket_path
        self.store_dir = store_dir
        self.real_store_dir = real_store_dir
        self._idle: list[Connection] = []
        self._pool_size = pool_size
        # the daemon forks a process per connection: a burst of requests must queue for a few
        # connections, not open hundreds (the socket's backlog overflows and connects fail)
        self._queries = trio.CapacityLimiter(pool_size)
        self.prefer_files = prefer_files
        self._path_names: dict[str, str] = {}

    async def _connect(self) -> Connection:
        try:
            stream = await trio.open_unix_socket(str(self.socket_path))
        except OSError as exc:
            raise ConnectFailed(
                f"cannot connect to the nix-daemon at {self.socket_path}: {exc.strerror}"
            ) from exc
        conn = Connection(stream)
        try:
            with trio.fail_after(30):
                await conn.handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, DaemonGone) as exc:
            await conn.aclose()
            raise ConnectFailed(
                f"the nix-daemon at {self.socket_path} dropped the connection: {exc}"
            ) from exc
        except BaseException:
            await conn.aclose()
            raise
        return conn

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        conn = self._idle.pop() if self._idle else await self._connect()
        ok = False
        try:
            yield conn
            ok = True
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise DaemonGone(f"the nix-daemon connection broke: {exc}") from exc
        finally:
            # a connection interrupted mid-operation is in an unknown state: drop it
            if ok and len(self._idle) < self._pool_size:
                self._idle.append(conn)
            else:
                with trio.CancelScope(shield=True):
                    await conn.aclose()

    async def _query(self, operation: Callable[[Connection], Awaitable[T]]) -> T:
        """Run one query on a pooled connection; a pooled connection the daemon has since closed
        (a daemon restart) is replaced once, transparently."""
        async with self._queries:
            for attempt in range(1, CONNECT_ATTEMPTS + 1):
                reused = bool(self._idle)
                try:
                    with trio.fail_after(QUERY_TIMEOUT):
                        async with self._connection() as conn:
                            return await operation(conn)
                except trio.TooSlowError as exc:
                    raise DaemonError(f"the nix-daemon did not answer within {QUERY_TIMEOUT:.0f} s") from exc
                except ConnectFailed:
                    if attempt == CONNECT_ATTEMPTS:
                        raise
                    await trio.sleep(0.01 * 2**attempt)  # the daemon forks a worker per connection
                except DaemonGone:
                    if not (reused and attempt == 1):
                        raise
            raise AssertionError("unreachable")

    async def path_from_hash_part(self, hash_part: str) -> str | None:
        async def op(conn: Connection) -> str | None:
            await conn.send(u64(OP_QUERY_PATH_FROM_HASH_PART) + wire_str(hash_part))
            await conn.process_stderr()
            path = await conn.read_str()
            return path or None

        return await self._query(op)

    async def path_info(self, path: str) -> PathInfo | None:
        async def op(conn: Connection) -> tuple[str, str, list[str], int, int, list[str], str] | None:
            await conn.send(u64(OP_QUERY_PATH_INFO) + wire_str(path))
            await conn.process_stderr()
            if conn.minor >= 17 and not await conn.read_u64():
                return None
            deriver = await conn.read_str()
            nar_hash = await conn.read_str()
            references = await conn.read_strings()
            registration_time = await conn.read_u64()
            nar_size = await conn.read_u64()
            sigs: list[str] = []
            ca = ""
            if conn.minor >= 16:
                await conn.read_u64()  # ultimate
                sigs = await conn.read_strings()
                ca = await conn.read_str()
            return deriver, nar_hash, references, registration_time, nar_size, sigs, ca

        found = await self._query(op)
        if found is None:
            return None
        deriver, nar_hash, references, registration_time, nar_size, sigs, ca = found
        try:
            digest = parse_sha256(nar_hash)
        except HashFormatError as exc:
            raise DaemonError(f"the daemon sent a NAR hash we cannot read: {nar_hash!r}") from exc
        return PathInfo(
            path=path,
            nar_hash=digest,
            nar_size=nar_size,
            references=tuple(sorted(references)),
            deriver=deriver or None,
            sigs=tuple(sigs),
            ca=ca or None,
            registration_time=registration_time,
        )

    async def nar_stream(self, path: str, size: int) -> AsyncIterator[bytes]:
        """Exactly `size` bytes of the path's NAR, as the daemon dumps it."""
        async with self._connection() as conn:
            await conn.send(u64(OP_NAR_FROM_PATH) + wire_str(path))
            await conn.process_stderr()
            left = size
            if conn.buf:
                head = bytes(conn.buf[:left])
                del conn.buf[: len(head)]
                left -= len(head)
                yield head
            while left:
                data = await conn.stream.receive_some(min(left, 1 << 20))
                if not data:
                    raise DaemonError("the daemon closed the connection mid-NAR")
                left -= len(data)
                yield data

    def real_path(self, path: str) -> bytes:
        return real_path(path, self.store_dir, self.real_store_dir)

    async def info_from_hash_part(self, hash_part: str) -> PathInfo | None:
        # a hash part names one store path for ever; only its validity changes (GC), and the
        # path-info query checks that: remembering the name saves a daemon round trip
        path = self._path_names.get(hash_part)
        if path is None:
            path = await self.path_from_hash_part(hash_part)
            if path is None:
                return None
        info = await self.path_info(path)
        if info is None:
            self._path_names.pop(hash_part, None)
            return None
        if len(self._path_names) >= PATH_NAMES:
            self._path_names.clear()
        self._path_names[hash_part] = path
        return info

    def servable(self, info: PathInfo) -> bool:
        return True  # the daemon can always dump a path it lists as valid

    def fs_nar(self, info: PathInfo) -> FsNar | None:
        """Store files are world-readable as Nix makes them; when this process can read the path,
        the NAR is made from the files (sendfile, compressed copies) and the daemon only answers
        metadata. The client checks the NAR hash either way."""
        if not self.prefer_files:
            return None
        real = self.real_path(info.path)
        if not (os.path.lexists(real) and os.access(real, os.R_OK)):
            return None
        return FsNar(real, info.nar_size)

    async def nar(self, info: PathInfo) -> FsNar | StreamedNar:
        found = self.fs_nar(info)
        if found is not None:
            return found
        return StreamedNar(info.nar_size, lambda: self.nar_stream(info.path, info.nar_size))

    async def aclose(self) -> None:
        while self._idle:
            await self._idle.pop().aclose()
