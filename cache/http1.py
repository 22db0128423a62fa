"""Our HTTP/1.1 transport on trio, with `os.sendfile` for NAR contents.

Hypercorn's generic ASGI path costs several times more per request than a direct loop on
trio, and it cannot hand file contents to the kernel (see docs/benchmarks.md); message heads
are parsed and written by `h1proto`. HTTP/2 (h2c prior knowledge, or ALPN `h2` over TLS) is
handed to hypercorn by the server, see `asgi.py`.

Rules: a response's head goes out only once the route has validated everything; identity
bodies carry Content-Length; when a body fails half-way the connection is cut, never finished.
"""

from __future__ import annotations

import email.utils
import errno
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

import trio

from .h1proto import MAX_HEAD_BYTES, BadRequest, RequestHead, find_head_end, parse_head, write_head
from .http import Request, Response, SegmentsBody, StreamBody, error
from .nar import FileRegion, NarError, read_region
from .store import StoreError

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("harmonia.http")
access_log = logging.getLogger("harmonia.access")

HEADER_TIMEOUT = 30.0
KEEPALIVE_TIMEOUT = 75.0
SEND_TIMEOUT = 300.0  # a client that accepts nothing for this long is gone
LINGER_SECONDS = 1.0
LINGER_BYTES = 1 << 20
READ_SIZE = 64 * 1024
SENDFILE_CHUNK = 8 * 1024 * 1024
SERVER = "harmonia-cache"
_done = object()
_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    """The Date header, formatted once a second rather than once a response."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True))
    return _date_cache[1]


class BodyFailed(Exception):
    """The body could not be produced after the head went out: cut the connection."""


class H1Connection:
    def __init__(
        self,
        stream: trio.abc.Stream,
        app: App,
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
        self.app = app
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
                keep = await self._handle(head)
                if head.has_body:
                    await self._linger()  # a request body we did not read
                    return
                if not keep:
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
        head must arrive within HEADER_TIMEOUT, however slowly its bytes trickle in.
        """
        searched = 0
        deadline = trio.current_time() + (HEADER_TIMEOUT if self.buf else wait)
        while True:
            end = find_head_end(self.buf, max(0, searched - 3))
            if end != -1:
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
                    data = await self.stream.receive_some(READ_SIZE)
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

    async def _refuse(self, exc: BadRequest) -> None:
        resp = error(exc.status, f"bad request: {exc}")
        self.app.metrics.observe("other", resp.status, 0.0, 0)
        try:
            await self._send_response(resp, head_only=False, keep_alive=False)
        except (trio.BrokenResourceError, trio.TooSlowError, OSError):
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
        started = time.monotonic()
        path, _, query = head.target.partition("?")
        if not path.startswith("/"):
            resp = error(400, "request target must be a path")
        else:
            request = Request(head.method, path, query, head.headers, self.client)
            try:
                resp = await self.app.handle(request)
            except Exception:
                log.exception("internal error on %s %s", head.method, path)
                resp = error(500, "internal server error (logged)")
        keep_alive = head.keep_alive and not self.stopping.is_set()
        sent = 0
        try:
            sent = await self._send_response(
                resp, head_only=head.method == "HEAD", keep_alive=keep_alive, http10=head.minor == 0
            )
        finally:
            elapsed = time.monotonic() - started
            self.app.metrics.observe(resp.route, resp.status, elapsed, sent)
            if access_log.isEnabledFor(logging.DEBUG):
                access_log.debug(
                    "%s %s %s HTTP/1.%d %d %d %.1fms",
                    self.client,
                    head.method,
                    path,
                    head.minor,
                    resp.status,
                    sent,
                    elapsed * 1000,
                )
        # an HTTP/1.0 stream of unknown length ended by closing the connection
        return keep_alive and not (head.minor == 0 and resp.content_length is None)

    async def _send_response(
        self, resp: Response, *, head_only: bool, keep_alive: bool, http10: bool = False
    ) -> int:
        headers = [*resp.headers, ("Server", SERVER), ("Date", _http_date())]
        body = resp.body
        length = resp.content_length
        chunked = False
        if length is not None:
            headers.append(("Content-Length", str(length)))
        elif http10:
            keep_alive = False  # the end of the body is the end of the connection
        else:
            headers.append(("Transfer-Encoding", "chunked"))
            chunked = True
        head = write_head(resp.status, headers, close=not keep_alive)
        if head_only:
            await self._send(head)
            return 0
        if isinstance(body, bytes):
            # small answers (narinfo, errors) leave in one write
            await self._send(head + body)
            return len(body)
        with trio.fail_after(SEND_TIMEOUT):
            await self.stream.send_all(head)
        is_nar = resp.route == "nar"
        if is_nar:
            self.app.metrics.nar_started()
        try:
            if isinstance(body, SegmentsBody):
                return await self._send_segments(body)
            return await self._send_stream(body, chunked)
        finally:
            if is_nar:
                self.app.metrics.nar_finished()

    async def _send(self, data: bytes) -> None:
        with trio.fail_after(SEND_TIMEOUT):
            await self.stream.send_all(data)

    async def _send_segments(self, body: SegmentsBody) -> int:
        it = body.segments()
        sent = 0
        while True:
            try:
                seg = await trio.to_thread.run_sync(next, it, _done)
            except (NarError, OSError) as exc:
                log.error("NAR body failed after %d bytes: %s", sent, exc)
                raise BodyFailed from exc
            if seg is _done:
                break
            if isinstance(seg, bytes):
                if seg:
                    await self._send(seg)
                    sent += len(seg)
                continue
            assert isinstance(seg, FileRegion)
            sent += await self._send_region(seg)
        if sent != body.length:
            log.error("body was %d bytes, promised %d: cutting the connection", sent, body.length)
            raise BodyFailed
        return sent

    async def _send_region(self, region: FileRegion) -> int:
        if self.sock is None:
            chunks = read_region(region)
            n = 0
            while True:
                try:
                    data = await trio.to_thread.run_sync(next, chunks, _done)
                except (NarError, OSError) as exc:
                    raise BodyFailed from exc
                if data is _done:
                    return n
                assert isinstance(data, bytes)
                await self._send(data)
                n += len(data)
        try:
            fd = os.open(region.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise BodyFailed from exc
        try:
            return await self._sendfile(fd, region.offset, region.size)
        finally:
            os.close(fd)

    async def _sendfile(self, fd: int, offset: int, size: int) -> int:
        assert self.sock is not None
        out = self.sock.fileno()
        left = size
        pos = offset
        deadline = trio.current_time() + SEND_TIMEOUT
        while left:
            try:
                n = os.sendfile(out, fd, pos, min(left, SENDFILE_CHUNK))
            except BlockingIOError:
                with trio.fail_after(max(0.0, deadline - trio.current_time())):
                    await trio.lowlevel.wait_writable(self.sock)
                continue
            except OSError as exc:
                raise BodyFailed from exc
            if n == 0:
                raise BodyFailed(f"file ended {left} bytes early")
            pos += n
            left -= n
            deadline = trio.current_time() + SEND_TIMEOUT
            await trio.lowlevel.checkpoint()
        return size

    async def _send_stream(self, body: StreamBody, chunked: bool) -> int:
        sent = 0
        stream = body.chunks()
        try:
            async for chunk in stream:
                if chunk:
                    await self._send(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                    sent += len(chunk)
        except (NarError, OSError, StoreError) as exc:
            log.error("streamed body failed after %d bytes: %s", sent, exc)
            raise BodyFailed from exc
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with trio.CancelScope(shield=True):
                    await aclose()
        if body.length is not None and sent != body.length:
            raise BodyFailed
        if chunked:
            await self._send(b"0\r\n\r\n")
        return sent
