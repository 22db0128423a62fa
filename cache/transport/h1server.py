"""Our HTTP/1.1 server on trio, with `os.sendfile` for NAR contents.

Hypercorn's generic ASGI path costs several times more per request than a direct loop on
trio, and it cannot hand file contents to the kernel (see docs/benchmarks.md); message heads
are parsed and written by `h1codec`, responses go out through the shared body writer
(`delivery.deliver`) and this module's `H1Sink`.

Rules: a response's head goes out only once the route has validated everything; identity
bodies carry Content-Length; when a body fails half-way the connection is cut, never finished.
A request body is read only when the route asks for it; one left unread ends the connection
after the answer (a small rest is drained instead, and the connection kept).
"""

from __future__ import annotations

import email.utils
import errno
import logging
import os
import socket
import time

import trio

from ..metrics import Metrics
from ..nar import FileRegion, NarError, read_region
from ..plainsocket import receive_when_ready, write_now
from .delivery import BodyFailed, Exchange, Handler, deliver, respond
from .h1codec import (
    MAX_HEAD_BYTES,
    BadRequest,
    ChunkedDecoder,
    RequestHead,
    find_head_end,
    origin_form,
    parse_head,
    write_head,
)
from .messages import EMPTY_BODY, Request, RequestBody, RequestBodyError, Response, error

log = logging.getLogger("harmonia.http")

HEADER_TIMEOUT = 30.0
KEEPALIVE_TIMEOUT = 75.0
SEND_TIMEOUT = 300.0  # a client that accepts nothing for this long is gone
LINGER_SECONDS = 1.0
LINGER_BYTES = 1 << 20
DRAIN_BYTES = 64 * 1024  # an unread request body this small is read and dropped, keeping the connection
READ_SIZE = 64 * 1024
SENDFILE_CHUNK = 8 * 1024 * 1024
SERVER = "harmonia-cache"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_done = object()
_date_cache: tuple[int, str] = (0, "")


def http_date() -> str:
    """The Date header, formatted once a second rather than once a response."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True))
    return _date_cache[1]


class H1RequestBody(RequestBody):
    """A request body read from the connection: Content-Length bytes, or chunked."""

    def __init__(self, conn: H1Connection, head: RequestHead) -> None:
        super().__init__(head.body_length, expects_continue=head.expects_continue)
        self._conn = conn
        self._decoder = ChunkedDecoder() if head.chunked else None
        self._framed = head.chunked or head.body_length is not None

    async def _send_continue(self) -> None:
        await self._conn.send(CONTINUE)

    async def _read(self, max_bytes: int) -> bytes:
        conn = self._conn
        if not self._framed:
            raise RequestBodyError("the request body's transfer coding is not supported (only chunked)")
        while True:
            if self._decoder is None:
                if conn.buf:
                    out = bytes(conn.buf[:max_bytes])
                    del conn.buf[:max_bytes]
                    return out
            else:
                try:
                    found = self._decoder.decode(conn.buf, max_bytes)
                except BadRequest as exc:
                    raise RequestBodyError(str(exc)) from exc
                if found is not None:
                    return found
            try:
                data = await conn.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise RequestBodyError(f"the connection broke during the request body: {exc}") from exc
            if not data:
                if self._decoder is not None:
                    raise RequestBodyError("the request body ended before its last chunk")
                return b""
            conn.buf += data


class H1Connection:
    def __init__(
        self,
        stream: trio.abc.Stream,
        handler: Handler,
        metrics: Metrics,
        *,
        sock: trio.socket.SocketType | None,
        client: str,
        prefix: bytes = b"",
        idle: set[trio.CancelScope] | None = None,
        stopping: trio.Event | None = None,
    ) -> None:
        self.stream = stream
        # on shutdown the server cancels connections idling between requests at once, and
        # answers the rest with Connection: close
        self.idle = idle if idle is not None else set()
        self.stopping = stopping if stopping is not None else trio.Event()
        self.handler = handler
        self.metrics = metrics
        self.sock = sock  # set when the stream is plain TCP/unix: sendfile allowed
        self.client = client
        self.buf = bytearray(prefix)

    async def run(self) -> None:
        try:
            while True:
                try:
                    raw = await self._read_head(HEADER_TIMEOUT if self.buf else KEEPALIVE_TIMEOUT)
                    if raw is None:
                        return
                    head = parse_head(raw)
                except BadRequest as exc:
                    await self._refuse(exc)
                    return
                if not await self._handle(head):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, BodyFailed):
            return
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT):
                log.warning("connection from %s: %s", self.client, exc)
            return
        finally:
            with trio.CancelScope(shield=True):
                # a TLS close_notify to a peer that reads nothing would wait for ever
                with trio.move_on_after(5) as closing:
                    await self.stream.aclose()
                if closing.cancelled_caught:
                    await trio.aclose_forcefully(self.stream)

    async def _read_head(self, wait: float) -> bytes | None:
        """The next request head, or None at end of stream or when the client stays silent.

        Waiting for a first byte may take `wait` (keep-alive); once a head has begun, the whole
        head must arrive within HEADER_TIMEOUT, however slowly its bytes trickle in. The size
        limit holds for each head, however many reads brought it.
        """
        searched = 0
        deadline = trio.current_time() + (HEADER_TIMEOUT if self.buf else wait)
        while True:
            end = find_head_end(self.buf, max(0, searched - 3))
            if end != -1:
                if end > MAX_HEAD_BYTES:
                    raise BadRequest(431, "request head too large")
                raw = bytes(self.buf[:end])
                del self.buf[:end]
                return raw
            if len(self.buf) > MAX_HEAD_BYTES:
                raise BadRequest(431, "request head too large")
            searched = len(self.buf)
            idle = not self.buf
            if idle and self.stopping.is_set():
                return None
            with trio.move_on_at(deadline) as scope:
                if idle:
                    self.idle.add(scope)
                try:
                    data = await (
                        self._receive_plain()
                        if self.sock is not None
                        else self.stream.receive_some(READ_SIZE)
                    )
                finally:
                    self.idle.discard(scope)
                if not data:
                    if self.buf.strip():
                        raise BadRequest(400, "incomplete request head")
                    return None
                if idle:
                    deadline = trio.current_time() + HEADER_TIMEOUT
                self.buf += data
                continue
            return None

    async def _receive_plain(self) -> bytes:
        """The next bytes from a plain socket. A keep-alive client sends its next request after
        reading the answer, so the socket is waited on first."""
        assert self.sock is not None
        return await receive_when_ready(self.sock, READ_SIZE)

    async def _refuse(self, exc: BadRequest) -> None:
        resp = error(exc.status, f"bad request: {exc}")
        try:
            await deliver(
                H1Sink(self, keep_alive=False),
                resp,
                Exchange(self.metrics, self.client, "-", "-", "HTTP/1.1"),
                head_only=False,
            )
        except (trio.BrokenResourceError, trio.TooSlowError, BodyFailed, OSError):
            return
        await self._linger()

    async def _linger(self) -> None:
        """Read and drop what the client still sends, briefly, before closing: closing with
        unread input makes the kernel send a reset, and the client may lose our answer."""
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                return
        with trio.move_on_after(LINGER_SECONDS):
            drained = 0
            while drained < LINGER_BYTES:
                try:
                    data = await self.stream.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, OSError):
                    return
                if not data:
                    return
                drained += len(data)

    async def _handle(self, head: RequestHead) -> bool:
        """Answer one request; True when the connection may serve another."""
        path, _, query = origin_form(head.target).partition("?")
        exchange = Exchange(self.metrics, self.client, head.method, path, f"HTTP/1.{head.minor}")
        try:
            return await self._answer(head, path, query, exchange)
        finally:
            exchange.close()

    async def _answer(self, head: RequestHead, path: str, query: str, exchange: Exchange) -> bool:
        body = H1RequestBody(self, head) if head.has_body else EMPTY_BODY
        if not path.startswith("/"):
            resp = error(400, "request target must be a path")
        else:
            resp = await respond(
                self.handler, Request(head.method, path, query, head.headers, self.client, body)
            )
        # a body the route left unread: a small announced rest is drained, else the connection ends
        unread = head.has_body and not body.complete
        drain = (
            unread
            and body.failed is None
            and body.length is not None
            and body.length - body.received <= DRAIN_BYTES
            and (body.started or not body.expects_continue)
        )
        keep_alive = head.persistent and not self.stopping.is_set() and (not unread or drain)
        sink = H1Sink(self, keep_alive=keep_alive, http10=head.minor == 0)
        await deliver(sink, resp, exchange, head_only=head.method == "HEAD")
        if drain:
            try:
                with trio.fail_after(HEADER_TIMEOUT):
                    while await body.receive(READ_SIZE):
                        pass
            except (RequestBodyError, trio.TooSlowError):
                return False
        elif unread:
            await self._linger()
            return False
        return sink.keep_alive

    async def send(self, data: bytes) -> None:
        if self.sock is not None:
            # the common case, a response the kernel takes whole
            try:
                sent = write_now(self.sock, data)
            except OSError as exc:  # reset, broken pipe: what send_all would say
                raise trio.BrokenResourceError(str(exc)) from exc
            if sent == len(data):
                return
            data = data[sent:]
        with trio.fail_after(SEND_TIMEOUT):
            await self.stream.send_all(data)


class H1Sink:
    """One HTTP/1.1 response: the head waits to leave with the first body bytes (one write for
    small answers); file regions go out with sendfile when the stream is a plain socket."""

    def __init__(self, conn: H1Connection, *, keep_alive: bool, http10: bool = False) -> None:
        self.conn = conn
        self.keep_alive = keep_alive
        self.http10 = http10
        self.chunked = False
        self.pending = b""

    async def start(self, resp: Response, length: int | None, *, head_only: bool) -> None:
        headers = [*resp.headers, ("Server", SERVER), ("Date", http_date())]
        if length is not None:
            headers.append(("Content-Length", str(length)))
        elif self.http10:
            self.keep_alive = False  # the end of the body is the end of the connection
        else:
            headers.append(("Transfer-Encoding", "chunked"))
            self.chunked = not head_only
        self.pending = write_head(resp.status, headers, close=not self.keep_alive)
        if head_only:
            await self._flush()

    async def _flush(self) -> None:
        if self.pending:
            data, self.pending = self.pending, b""
            await self.conn.send(data)

    async def data(self, chunk: bytes) -> None:
        framed = b"%x\r\n%b\r\n" % (len(chunk), chunk) if self.chunked else chunk
        if self.pending:
            framed, self.pending = self.pending + framed, b""
        await self.conn.send(framed)

    async def finish(self) -> None:
        if self.chunked:
            self.pending += b"0\r\n\r\n"
        await self._flush()

    async def region(self, region: FileRegion) -> int:
        if self.conn.sock is None or self.chunked:
            chunks = read_region(region)
            n = 0
            try:
                while True:
                    try:
                        data = await trio.to_thread.run_sync(next, chunks, _done)
                    except (NarError, OSError) as exc:
                        raise BodyFailed(str(exc)) from exc
                    if data is _done:
                        return n
                    assert isinstance(data, bytes)
                    await self.data(data)
                    n += len(data)
            finally:
                chunks.close()
        await self._flush()
        try:
            fd = os.open(region.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise BodyFailed(str(exc)) from exc
        try:
            return await self._sendfile(fd, region.offset, region.size)
        finally:
            os.close(fd)

    async def _sendfile(self, fd: int, offset: int, size: int) -> int:
        sock = self.conn.sock
        assert sock is not None
        out = sock.fileno()
        left = size
        pos = offset
        deadline = trio.current_time() + SEND_TIMEOUT
        while left:
            try:
                n = os.sendfile(out, fd, pos, min(left, SENDFILE_CHUNK))
            except BlockingIOError:
                with trio.fail_after(max(0.0, deadline - trio.current_time())):
                    await trio.lowlevel.wait_writable(sock)
                continue
            except OSError as exc:
                raise BodyFailed(str(exc)) from exc
            if n == 0:
                raise BodyFailed(f"file ended {left} bytes early")
            pos += n
            left -= n
            deadline = trio.current_time() + SEND_TIMEOUT
            await trio.lowlevel.checkpoint()
        return size
