"""The nix-daemon worker protocol (client side), and a store backend on top of it.

Wire rules (Nix's): numbers are little-endian u64; strings are a length, the bytes, zero padding to
8. After each operation the daemon sends log messages until STDERR_LAST, or STDERR_ERROR. We speak
protocol 1.34 (Nix 2.8) and accept any daemon from 1.21 on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import TypeVar

import trio

from .hashes import HashFormatError, parse_sha256
from .narinfo import PathInfo
from .plainsocket import receive_when_ready, write_now
from .store import FsNar, StoreError, StreamedNar, real_path
from .storepath import hash_part_of

WORKER_MAGIC_1 = 0x6E697863
WORKER_MAGIC_2 = 0x6478696F
CLIENT_VERSION = (1 << 8) | 34
MIN_DAEMON_MINOR = 21

OP_ADD_TEMP_ROOT = 11
OP_ADD_INDIRECT_ROOT = 12
OP_QUERY_PATH_INFO = 26
OP_QUERY_PATH_FROM_HASH_PART = 29
OP_QUERY_VALID_PATHS = 31
OP_NAR_FROM_PATH = 38
OP_ADD_TO_STORE_NAR = 39
FRAMED_NAR_MINOR = 23  # AddToStoreNar with a framed NAR, no STDERR_READ round trips
FRAME = 1 << 20

_U64 = struct.Struct("<Q")
STDERR_NEXT = 0x6F6C6D67
STDERR_READ = 0x64617461
STDERR_WRITE = 0x64617416
STDERR_LAST = 0x616C7473
STDERR_ERROR = 0x63787470
STDERR_START_ACTIVITY = 0x53545254
STDERR_STOP_ACTIVITY = 0x53544F50
STDERR_RESULT = 0x52534C54

MAX_STRING = 64 * 1024 * 1024
log = logging.getLogger("harmonia.daemon")
T = TypeVar("T")
QUERY_TIMEOUT = 30.0
RECONNECT_SECONDS = 3.0  # how long a query keeps retrying while the daemon restarts
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


def wire_strings(items: Iterable[str]) -> bytes:
    listed = list(items)
    return u64(len(listed)) + b"".join(wire_str(item) for item in listed)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def plain_text(message: str) -> str:
    """A daemon message without its terminal colour codes."""
    return _ANSI.sub("", message)


def add_to_store_nar_header(info: PathInfo, *, repair: bool = False) -> bytes:
    """AddToStoreNar's fields before the framed NAR (the daemon checks signatures and hash)."""
    return b"".join(
        (
            u64(OP_ADD_TO_STORE_NAR),
            wire_str(info.path),
            wire_str(info.deriver or ""),
            wire_str(info.nar_hash.hex()),
            wire_strings(sorted(info.references)),
            u64(info.registration_time),
            u64(info.nar_size),
            u64(0),  # ultimate: not built here
            wire_strings(info.sigs),
            wire_str(info.ca or ""),
            u64(1 if repair else 0),
            u64(0),  # dontCheckSigs: never (and the daemon ignores it for untrusted users)
        )
    )


class _Short(Exception):
    """The buffer ends before the reply does."""


def _u64_at(buf: bytearray, pos: int) -> tuple[int, int]:
    if pos + 8 > len(buf):
        raise _Short
    return int(_U64.unpack_from(buf, pos)[0]), pos + 8


def _str_at(buf: bytearray, pos: int) -> tuple[str, int]:
    n, pos = _u64_at(buf, pos)
    if n > MAX_STRING:
        raise DaemonError(f"the daemon sent a string of {n} bytes")
    end = pos + n + (-n) % 8
    if end > len(buf):
        raise _Short
    return buf[pos : pos + n].decode("utf-8", "surrogateescape"), end


def _strings_at(buf: bytearray, pos: int) -> tuple[list[str], int]:
    count, pos = _u64_at(buf, pos)
    out = []
    for _ in range(count):
        text, pos = _str_at(buf, pos)
        out.append(text)
    return out, pos


def _fields_at(buf: bytearray, pos: int) -> int:
    count, pos = _u64_at(buf, pos)
    for _ in range(count):
        kind, pos = _u64_at(buf, pos)
        if kind == 0:
            _, pos = _u64_at(buf, pos)
        elif kind == 1:
            _, pos = _str_at(buf, pos)
        else:
            raise DaemonError(f"unknown log field type {kind}")
    return pos


def _error_at(buf: bytearray, pos: int, minor: int) -> str:
    """STDERR_ERROR's message (after its tag at `pos`)."""
    if minor < 26:
        message, pos = _str_at(buf, pos)
        _u64_at(buf, pos)  # status
        return message
    _, pos = _str_at(buf, pos)  # its type ("Error")
    _, pos = _u64_at(buf, pos)  # level
    _, pos = _str_at(buf, pos)  # name
    message, pos = _str_at(buf, pos)
    have_pos, pos = _u64_at(buf, pos)
    if have_pos:
        raise DaemonError("daemon error with a position: unsupported")
    traces, pos = _u64_at(buf, pos)
    for _ in range(traces):
        trace_pos, pos = _u64_at(buf, pos)
        if trace_pos:
            raise DaemonError("daemon error trace with a position: unsupported")
        _, pos = _str_at(buf, pos)
    return message


def after_log_messages(buf: bytearray, pos: int, minor: int) -> int:
    """Where an operation's answer starts: past the log messages the daemon sends before it,
    up to STDERR_LAST (read from the buffer in one go, with the answer when there is one).
    STDERR_ERROR raises DaemonError with the daemon's message; _Short when the buffer ends
    first."""
    while True:
        msg, pos = _u64_at(buf, pos)
        if msg == STDERR_LAST:
            return pos
        if msg == STDERR_NEXT:
            _, pos = _str_at(buf, pos)
        elif msg == STDERR_ERROR:
            raise DaemonError(plain_text(_error_at(buf, pos, minor)))
        elif msg == STDERR_START_ACTIVITY:
            for _field in range(3):  # id, level, type
                _, pos = _u64_at(buf, pos)
            _, pos = _str_at(buf, pos)  # text
            pos = _fields_at(buf, pos)
            _, pos = _u64_at(buf, pos)  # parent
        elif msg == STDERR_STOP_ACTIVITY:
            _, pos = _u64_at(buf, pos)
        elif msg == STDERR_RESULT:
            _, pos = _u64_at(buf, pos)
            _, pos = _u64_at(buf, pos)
            pos = _fields_at(buf, pos)
        elif msg in (STDERR_READ, STDERR_WRITE):
            raise DaemonError("the daemon asked for a data transfer we did not start")
        else:
            raise DaemonError(f"unknown message {msg:#x} from the daemon")


def _str_answer(buf: bytearray, pos: int, minor: int) -> tuple[int, str]:
    text, end = _str_at(buf, pos)
    return end, text


PathInfoFields = tuple[str, str, list[str], int, int, list[str], str]


def parse_path_info_reply(buf: bytearray, pos: int, minor: int) -> tuple[int, PathInfoFields | None]:
    """QueryPathInfo's answer after STDERR_LAST, from `pos`: (end, fields or None when the path
    is not valid). Raises _Short when the buffer ends first."""
    if minor >= 17:
        valid, pos = _u64_at(buf, pos)
        if not valid:
            return pos, None
    deriver, pos = _str_at(buf, pos)
    nar_hash, pos = _str_at(buf, pos)
    references, pos = _strings_at(buf, pos)
    registration_time, pos = _u64_at(buf, pos)
    nar_size, pos = _u64_at(buf, pos)
    sigs: list[str] = []
    ca = ""
    if minor >= 16:
        _ultimate, pos = _u64_at(buf, pos)
        sigs, pos = _strings_at(buf, pos)
        ca, pos = _str_at(buf, pos)
    return pos, (deriver, nar_hash, references, registration_time, nar_size, sigs, ca)


class QuickReplies:
    """When a query may wait for its answer without returning to trio's loop.

    A nix-daemon answers a metadata query in 40-60 µs of wall time, while handing the wait to
    trio (register the socket, park the task, poll, wake it) costs our process about 30 µs of
    CPU: on a closure's look-ahead, which queries one path after another on the cores the
    clients also use, that was a third of a daemon query's cost. So the only query in flight
    polls its socket for up to WAIT_MS first. That blocks this worker's loop for at most that
    long, and only while it has nothing else to ask of the daemon; once an answer was late,
    the queries of the next BACKOFF seconds wait through trio as before (a busy or slow daemon
    never stalls the loop more than once per BACKOFF)."""

    WAIT_MS = 1
    BACKOFF = 1.0

    def __init__(self) -> None:
        self._late_until = 0.0

    def allowed(self, in_flight: int) -> bool:
        return in_flight <= 1 and time.monotonic() >= self._late_until

    def late(self) -> None:
        self._late_until = time.monotonic() + self.BACKOFF


class Connection:
    """One daemon connection with a read buffer. Not safe for concurrent use."""

    def __init__(self, stream: trio.SocketStream, generation: int = 0) -> None:
        self.stream = stream
        self.generation = generation  # the pool's generation when it was opened
        self.buf = bytearray()
        self.daemon_version = 0
        self.nix_version = ""
        # one poll object for the connection's life: the pool's liveness check and quick replies
        self._poller = select.poll()
        self._poller.register(stream.socket.fileno(), select.POLLIN)

    async def _fill(self, n: int) -> None:
        # the daemon's answer is never there yet right after a request: waited for, then read
        while len(self.buf) < n:
            data = await receive_when_ready(self.stream.socket, max(65536, n - len(self.buf)))
            if not data:
                raise DaemonGone("the daemon closed the connection")
            self.buf += data

    async def read_parsed(self, parse: Callable[[bytearray, int], tuple[int, T]]) -> T:
        """What `parse` reads from the start of the buffer, in one go once every byte it needs has
        arrived (fewer awaits than reading field by field)."""
        while True:
            try:
                end, value = parse(self.buf, 0)
            except _Short:
                await self._fill(len(self.buf) + 1)
                continue
            del self.buf[:end]
            return value

    async def exchange(
        self,
        request: bytes,
        answer: Callable[[bytearray, int, int], tuple[int, T]],
        quick: QuickReplies | None = None,
    ) -> T:
        """Send one request and read its answer: the log messages, then what `answer(buf, pos,
        minor)` reads. With `quick`, the answer is first waited for here (see QuickReplies); only
        what must wait for trio runs under a deadline (a cancel scope costs as much as the parse)."""
        minor = self.minor

        def parse(buf: bytearray, pos: int) -> tuple[int, T]:
            return answer(buf, after_log_messages(buf, pos, minor), minor)

        sent = write_now(self.stream.socket, request)
        if sent == len(request):
            if quick is not None and not self.buf:
                if self._poller.poll(quick.WAIT_MS):
                    with contextlib.suppress(BlockingIOError):  # then trio waits for it below
                        data = os.read(self.stream.socket.fileno(), 65536)
                        if not data:
                            raise DaemonGone("the daemon closed the connection")
                        self.buf += data
                else:
                    quick.late()
            try:
                end, value = parse(self.buf, 0)
            except _Short:
                pass
            else:
                del self.buf[:end]
                return value
        with trio.fail_after(QUERY_TIMEOUT):
            if sent < len(request):  # the kernel did not take the whole request at once
                await self.stream.send_all(request[sent:])
            return await self.read_parsed(parse)

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
        # a request the kernel takes whole (every query)
        sent = write_now(self.stream.socket, data)
        if sent < len(data):
            await self.stream.send_all(data[sent:])

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
        """Read the daemon's log messages up to STDERR_LAST (its error raises DaemonError)."""
        minor = self.minor
        await self.read_parsed(lambda buf, pos: (after_log_messages(buf, pos, minor), None))

    async def aclose(self) -> None:
        await self.stream.aclose()

    def close_now(self) -> None:
        self.stream.socket.close()

    def closed_by_peer(self) -> bool:
        """An idle connection has nothing to read: readable means the daemon closed or reset it."""
        try:
            fd = self.stream.socket.fileno()
        except OSError:
            return True
        if fd < 0:
            return True
        return bool(self._poller.poll(0))

    # --- operations for imports (push) ------------------------------------------------

    async def add_temp_root(self, path: str) -> None:
        """Keep `path` from garbage collection for as long as this connection lives."""
        await self.send(u64(OP_ADD_TEMP_ROOT) + wire_str(path))
        await self.process_stderr()
        await self.read_u64()

    async def add_indirect_root(self, link: str) -> None:
        """Make the symlink `link` (outside the store, into it) a GC root."""
        await self.send(u64(OP_ADD_INDIRECT_ROOT) + wire_str(link))
        await self.process_stderr()
        await self.read_u64()

    async def query_valid_paths(self, paths: Iterable[str]) -> set[str]:
        message = u64(OP_QUERY_VALID_PATHS) + wire_strings(paths)
        if self.minor >= 27:
            message += u64(0)  # do not substitute
        await self.send(message)
        await self.process_stderr()
        return set(await self.read_strings())

    async def add_to_store_nar(self, info: PathInfo, nar: Callable[[], AsyncIterator[bytes]]) -> None:
        """Import a NAR. The daemon's log messages are read while the frames go out (a daemon
        that fails early drains the remaining frames, then reports the error)."""
        if self.minor < FRAMED_NAR_MINOR:
            raise DaemonError(
                f"the nix-daemon speaks protocol 1.{self.minor}; imports need 1.{FRAMED_NAR_MINOR} (Nix 2.4) or newer"
            )
        await self.send(add_to_store_nar_header(info))

        async def frames() -> None:
            async for chunk in nar():
                for start in range(0, len(chunk), FRAME):
                    piece = chunk[start : start + FRAME]
                    await self.send(u64(len(piece)) + piece)
            await self.send(u64(0))

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(frames)
                await self.process_stderr()
        except BaseExceptionGroup as group:
            # the daemon's own word (an error message) explains more than a broken send
            errors: list[BaseException] = [e for e in group.exceptions if isinstance(e, DaemonError)]
            raise (errors or list(group.exceptions))[0] from None


def retry_pause(attempt: int) -> float:
    """Before retry `attempt` (1, 2, …): the first at once (a fresh connection replaces stale
    ones), then 20 ms doubling up to 250 ms while the daemon comes back."""
    return 0.0 if attempt <= 1 else min(0.25, 0.01 * 2 ** (attempt - 1))


async def connect(socket_path: Path, generation: int = 0) -> Connection:
    """A new connection, handshake done; `ConnectFailed` when the daemon is not there."""
    try:
        stream = await trio.open_unix_socket(str(socket_path))
    except OSError as exc:
        raise ConnectFailed(f"cannot connect to the nix-daemon at {socket_path}: {exc.strerror}") from exc
    conn = Connection(stream, generation)
    try:
        with trio.fail_after(30):
            await conn.handshake()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, DaemonGone) as exc:
        await conn.aclose()
        raise ConnectFailed(f"the nix-daemon at {socket_path} dropped the connection: {exc}") from exc
    except BaseException:
        await conn.aclose()
        raise
    return conn


class _Lease:
    """`async with store._connection() as conn`: a pooled connection for one operation (a class,
    not a generator: it is entered once per query). A broken one becomes DaemonGone and drops
    the pool's generation."""

    __slots__ = ("conn", "store")

    def __init__(self, store: DaemonStore) -> None:
        self.store = store
        self.conn: Connection | None = None

    async def __aenter__(self) -> Connection:
        self.conn = await self.store._take()
        return self.conn

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> bool:
        conn = self.conn
        assert conn is not None
        if not self.store._give_back(conn, exc is None):
            with trio.CancelScope(shield=True):
                await conn.aclose()
        if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
            self.store._invalidate(conn.generation)
            raise DaemonGone(f"the nix-daemon connection broke: {exc}") from exc
        if isinstance(exc, DaemonGone):
            self.store._invalidate(conn.generation)
        return False


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
        self._quick_replies = QuickReplies()
        # bumped when a connection turns out dead (a daemon restart kills every connection at
        # once): connections of an older generation are never reused
        self._generation = 0

    async def _connect(self) -> Connection:
        return await connect(self.socket_path, self._generation)

    def _invalidate(self, generation: int) -> None:
        """The first sign of a daemon restart: drop every pooled connection, not just this one."""
        if generation != self._generation:
            return  # already done for this restart
        self._generation += 1
        log.warning(
            "a nix-daemon connection closed (a daemon restart?): dropping %d pooled connection(s), retrying",
            len(self._idle) + 1,
        )
        for conn in self._idle:
            conn.close_now()
        self._idle.clear()

    async def _take(self) -> Connection:
        if self._idle:
            conn = self._idle.pop()
            if not conn.closed_by_peer():
                return conn
            conn.close_now()
            self._invalidate(conn.generation)
        return await self._connect()

    def _connection(self) -> _Lease:
        return _Lease(self)

    def _give_back(self, conn: Connection, ok: bool) -> bool:
        """Pool a connection after use; False when it must be closed instead (a connection
        interrupted mid-operation is in an unknown state)."""
        if ok and conn.generation == self._generation and len(self._idle) < self._pool_size:
            self._idle.append(conn)
            return True
        return False

    async def _query(self, request: bytes, answer: Callable[[bytearray, int, int], tuple[int, T]]) -> T:
        """One request and its answer on a pooled connection. The queries are reads, so one that
        meets a dead connection (a daemon restart) or a refused connect is retried on a new
        connection for up to RECONNECT_SECONDS: a daemon restart costs a delay, not an error."""
        # a free slot is taken without a scheduling round (most queries find one)
        try:
            self._queries.acquire_nowait()
        except trio.WouldBlock:
            await self._queries.acquire()
        try:
            quick = (
                self._quick_replies if self._quick_replies.allowed(self._queries.borrowed_tokens) else None
            )
            give_up = trio.current_time() + RECONNECT_SECONDS
            attempt = 0
            while True:
                try:
                    async with self._connection() as conn:
                        return await conn.exchange(request, answer, quick)
                except trio.TooSlowError as exc:
                    raise DaemonError(f"the nix-daemon did not answer within {QUERY_TIMEOUT:.0f} s") from exc
                except DaemonGone:
                    attempt += 1
                    pause = retry_pause(attempt)
                    if trio.current_time() + pause > give_up:
                        raise
                    await trio.sleep(pause)
        finally:
            self._queries.release()

    async def path_from_hash_part(self, hash_part: str) -> str | None:
        request = u64(OP_QUERY_PATH_FROM_HASH_PART) + wire_str(hash_part)
        return await self._query(request, _str_answer) or None

    async def path_info(self, path: str) -> PathInfo | None:
        request = u64(OP_QUERY_PATH_INFO) + wire_str(path)
        found = await self._query(request, parse_path_info_reply)
        if found is None:
            return None
        self._remember_name(path)
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
        """Exactly `size` bytes of the path's NAR, as the daemon dumps it. A connection that dies
        before the first byte (a daemon restart) is replaced, as for queries; one that dies later
        fails the stream (the client's download is cut and it retries)."""
        give_up = trio.current_time() + RECONNECT_SECONDS
        attempt = 0
        while True:
            started = False
            try:
                async with self._connection() as conn:
                    await conn.send(u64(OP_NAR_FROM_PATH) + wire_str(path))
                    await conn.process_stderr()
                    left = size
                    if conn.buf:
                        head = bytes(conn.buf[:left])
                        del conn.buf[: len(head)]
                        left -= len(head)
                        started = True
                        yield head
                    while left:
                        data = await conn.stream.receive_some(min(left, 1 << 20))
                        if not data:
                            raise DaemonGone("the daemon closed the connection mid-NAR")
                        left -= len(data)
                        started = True
                        yield data
                return
            except DaemonGone:
                attempt += 1
                pause = retry_pause(attempt)
                if started or trio.current_time() + pause > give_up:
                    raise
                await trio.sleep(pause)

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
        return info

    def _remember_name(self, path: str) -> None:
        """A valid path's name by its hash part (paths met by the look-ahead included: asked
        for again later, they cost one round trip, not two)."""
        if len(self._path_names) >= PATH_NAMES:
            self._path_names.clear()
        self._path_names[hash_part_of(path)] = path

    def servable(self, info: PathInfo) -> bool:
        return True  # the daemon can always dump a path it lists as valid

    def fs_nar(self, info: PathInfo) -> FsNar | None:
        """Store files are world-readable as Nix makes them; when this process can read the path,
        the NAR is made from the files (sendfile, compressed copies) and the daemon only answers
        metadata. The client checks the NAR hash either way."""
        if not self.prefer_files:
            return None
        real = self.real_path(info.path)
        if not os.access(real, os.R_OK):  # also False when it does not exist (one syscall)
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
