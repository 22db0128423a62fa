"""Our HTTP/1.1 transport: h11 driven directly on trio, with `os.sendfile` for NAR contents.

Hypercorn's generic ASGI path costs several times more per request than h11 on trio directly
(see docs/benchmarks.md), and it cannot hand file contents to the kernel. HTTP/2 (h2c prior
knowledge, or ALPN `h2` over TLS) is handed to hypercorn by the server, see `asgi.py`.

Rules: a response's headers go out only once the route has validated everything; identity
bodies carry Content-Length; when a body fails half-way the connection is cut, not finished.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import http
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

import h11
import trio

from .http import Request, Response, SegmentsBody, StreamBody, error
from .nar import FileRegion, NarError, read_region
from .store import StoreError

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("harmonia.http")

MAX_HEADER_BYTES = 32 * 1024
HEADER_TIMEOUT = 30.0
KEEPALIVE_TIMEOUT = 75.0
SEND_TIMEOUT = 300.0  # a client that accepts nothing for this long is gone
READ_SIZE = 64 * 1024
SENDFILE_CHUNK = 8 * 1024 * 1024
SERVER = b"harmonia-cache"
LINGER_SECONDS = 1.0
LINGER_BYTES = 1 << 20
_done = object()
_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}


class BodyFailed(Exception):
    """The body could not be produced after the headers went out: cut the connection."""


class _Region:
    """Lets h11 count a file region's length without us reading it (send_with_data_passthrough)."""

    __slots__ = ("region",)

    def __init__(self, region: FileRegion) -> None:
        self.region = region

    def __len__(self) -> int:
        return self.region.size


class H1Connection:
    def __init__(
        self,
        stream: trio.abc.Stream,
        app: App,
        *,
        sock: trio.socket.SocketType | None,
        client: str,
        prefix: bytes = b"",
    ) -> None:
        self.stream = stream
        self.app = app
        self.sock = sock  # set when the stream is plain TCP/unix: sendfile allowed
        self.client = client
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        if prefix:
            self.conn.receive_data(prefix)

    async def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            with trio.fail_after(SEND_TIMEOUT):
                await self.stream.send_all(data)

    async def _next_event(self, wait: float) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA] | None:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            with trio.move_on_after(wait):
                data = await self.stream.receive_some(READ_SIZE)
                self.conn.receive_data(bytes(data))
                continue
            return None  # timed out

    async def run(self) -> None:
        try:
            while True:
                timeout = KEEPALIVE_TIMEOUT if self.conn.their_state is h11.IDLE else HEADER_TIMEOUT
                try:
                    event = await self._next_event(timeout)
                except h11.RemoteProtocolError as exc:
                    await self._protocol_error(exc)
                    return
                if event is None or isinstance(event, h11.ConnectionClosed):
                    return
                if not isinstance(event, h11.Request):
                    return
                # a request without a body is complete now (EndOfMessage is queued); a request
                # with a body we do not read, and its connection closes after the response
                with contextlib.suppress(h11.RemoteProtocolError):
                    self.conn.next_event()
                await self._handle(event)
                if self.conn.their_state is not h11.DONE:
                    await self._linger()  # a request body we did not read
                    return
                if self.conn.our_state is h11.MUST_CLOSE:
                    return
                self.conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, BodyFailed):
            return
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT):
                log.warning("connection from %s: %s", self.client, exc)
            return
        finally:
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status = exc.error_status_hint
        if status == 400 and "exceeded" in str(exc).lower():
            status = 431
        resp = error(status, f"bad request: {exc}")
        resp.headers.append(("Connection", "close"))
        try:
            await self._send_response(resp, head=False)
        except h11.LocalProtocolError:
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
                data = await self.stream.receive_some(READ_SIZE)
                if not data:
                    break
                drained += len(data)

    async def _handle(self, event: h11.Request) -> None:
        started = time.monotonic()
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("ascii", "replace")
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("ascii", "replace")
            val = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {val}" if key in headers else val
        path, _, query = target.partition("?")
        if not path.startswith("/"):
            resp = error(400, "request target must be a path")
        else:
            request = Request(method, path, query, headers, self.client)
            try:
                resp = await self.app.handle(request)
            except Exception:
                log.exception("internal error on %s %s", method, path)
                resp = error(500, "internal server error (logged)")
        if self.conn.their_state is not h11.DONE:
            # we answer without reading a request body (we take none): this connection ends after
            resp.headers.append(("Connection", "close"))
        sent = 0
        try:
            sent = await self._send_response(resp, head=method == "HEAD")
        finally:
            self.app.metrics.observe(resp.route, resp.status, time.monotonic() - started, sent)

    async def _send_response(self, resp: Response, *, head: bool) -> int:
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers]
        headers.append((b"Server", SERVER))
        headers.append((b"Date", email.utils.formatdate(usegmt=True).encode()))
        length = resp.content_length
        if length is not None:
            headers.append((b"Content-Length", str(length).encode()))
        reason = _REASONS.get(resp.status, b"")
        await self._send(h11.Response(status_code=resp.status, headers=headers, reason=reason))
        if head:
            await self._send(h11.EndOfMessage())
            return 0
        body = resp.body
        is_nar = resp.route == "nar"
        if is_nar:
            self.app.metrics.nar_started()
        try:
            if isinstance(body, bytes):
                if body:
                    await self._send(h11.Data(data=body))
                sent = len(body)
            elif isinstance(body, SegmentsBody):
                sent = await self._send_segments(body)
            else:
                sent = await self._send_stream(body)
        finally:
            if is_nar:
                self.app.metrics.nar_finished()
        await self._send(h11.EndOfMessage())
        return sent

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
                    await self._send(h11.Data(data=seg))
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
                await self._send(h11.Data(data=data))
                n += len(data)
        # h11 accounts for the region's length; we move the bytes with sendfile
        self.conn.send_with_data_passthrough(h11.Data(data=_Region(region)))  # type: ignore[arg-type]
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

    async def _send_stream(self, body: StreamBody) -> int:
        sent = 0
        stream = body.chunks()
        try:
            async for chunk in stream:
                if chunk:
                    await self._send(h11.Data(data=chunk))
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
        return sent
