"""Our HTTP/2 server on the h2 library under trio: h2c prior knowledge and ALPN `h2` over TLS.

Why not hypercorn (which served HTTP/2 before): its stream buffer refills from the application
whenever a popped chunk is small, whatever the client's flow-control window, so one slow reader
made a worker buffer a whole NAR; and its ASGI bridge never stopped a body on a reset.

Rules:
- bounded memory: a body is produced only as the client's window opens: at most one piece of a
  body (≤ MAX_PIECE, or one chunk of a streamed body) is held per stream, and at most
  MAX_STREAMS streams per connection; request bodies are bounded by the windows we grant;
- a reset stream or a lost connection stops its production at once (the stream's cancel scope),
  and every file and stream iterator is closed (the body writer's `finally`);
- a body that fails after the head went out resets the stream (INTERNAL_ERROR), never ends it;
- a route that answers before the request body ended gets its stream reset (NO_ERROR) after
  the answer, so the client stops sending;
- rapid resets: a client may reset RESET_BURST streams at once, then RESET_RATE a second; beyond
  that the connection is closed (GOAWAY ENHANCE_YOUR_CALM); header lists are bounded by
  MAX_HEADER_LIST_SIZE (h2 enforces it, and bounds CONTINUATION frames).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio
from h2.errors import ErrorCodes

from ..metrics import Metrics
from ..nar import FileRegion
from .delivery import BodyFailed, Exchange, Handler, deliver, respond
from .h1server import SERVER, http_date
from .messages import EMPTY_BODY, Request, RequestBody, RequestBodyError, Response, error

log = logging.getLogger("harmonia.http2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_STREAMS = 100
MAX_HEADER_LIST_SIZE = 32 * 1024
STREAM_WINDOW = 256 * 1024  # what a client may send of one request body before we read it
CONNECTION_WINDOW = 1024 * 1024  # … and of all of them together
MAX_PIECE = 256 * 1024  # the most of a file read at once for one stream
READ_SIZE = 64 * 1024
KEEPALIVE_TIMEOUT = 75.0
SEND_TIMEOUT = 300.0  # a client that opens no window (or reads nothing) this long is gone
RESET_BURST = 100
RESET_RATE = 20.0  # resets a second, sustained


class _StreamGone(Exception):
    """The stream was reset or closed while we were about to write to it."""


class _Stream:
    __slots__ = ("body", "ended", "id", "reset", "scope")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.scope = trio.CancelScope()
        self.ended = False  # the client's side is closed (END_STREAM)
        self.reset = False
        self.body: H2RequestBody | None = None


class H2RequestBody(RequestBody):
    """A request body from DATA frames; our window opens as the route reads."""

    def __init__(
        self, conn: H2Connection, stream: _Stream, length: int | None, expects_continue: bool
    ) -> None:
        super().__init__(length, expects_continue=expects_continue)
        self._conn = conn
        self._stream = stream
        self._chunks: deque[tuple[bytes, int]] = deque()  # data, flow-controlled length
        self._ended = False
        self._cut: str | None = None
        self._arrived = trio.Event()

    def feed(self, data: bytes, flow: int) -> None:
        self._chunks.append((data, flow))
        self._arrived.set()

    def end(self) -> None:
        self._ended = True
        self._arrived.set()

    def cut(self, why: str) -> None:
        self._cut = why
        self._arrived.set()

    def release(self) -> None:
        """Give the window of what was received and never read back to the connection."""
        unread = sum(flow for _, flow in self._chunks)
        self._chunks.clear()
        if unread:
            self._conn.acknowledge(self._stream.id, unread)

    async def _send_continue(self) -> None:
        await self._conn.informational(self._stream, 100)

    async def _read(self, max_bytes: int) -> bytes:
        while not self._chunks:
            if self._cut is not None:
                raise RequestBodyError(self._cut)
            if self._ended:
                return b""
            self._arrived = trio.Event()
            await self._arrived.wait()
        data, flow = self._chunks[0]
        if len(data) > max_bytes:
            self._chunks[0] = (data[max_bytes:], flow)
            await trio.lowlevel.checkpoint()
            return data[:max_bytes]
        self._chunks.popleft()
        self._conn.acknowledge(self._stream.id, flow)
        await self._conn.flush()
        return data


class H2Sink:
    """One HTTP/2 response on one stream, sent only as far as the client's windows allow."""

    def __init__(self, conn: H2Connection, stream: _Stream) -> None:
        self.conn = conn
        self.stream = stream

    async def start(self, resp: Response, length: int | None, *, head_only: bool) -> None:
        headers = [(b":status", str(resp.status).encode())]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        headers += [(b"server", SERVER.encode()), (b"date", http_date().encode())]
        self.conn.h2_call(self.stream, "send_headers", self.stream.id, headers, end_stream=head_only)
        if head_only:
            await self.conn.flush()
        # otherwise the head leaves with the first DATA frame (one write for small answers)

    async def data(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            n = await self.conn.window(self.stream, len(view))
            frame = self.conn.h2.max_outbound_frame_size
            for start in range(0, n, frame):
                piece = bytes(view[start : min(start + frame, n)])
                self.conn.h2_call(self.stream, "send_data", self.stream.id, piece)
            view = view[n:]
            await self.conn.flush()  # all the frames the window allowed, in one write

    async def region(self, region: FileRegion) -> int:
        try:
            fd = await trio.to_thread.run_sync(os.open, region.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise BodyFailed(str(exc)) from exc
        try:
            offset, left = region.offset, region.size
            while left:
                n = await self.conn.window(self.stream, min(left, MAX_PIECE))
                try:
                    piece = await trio.to_thread.run_sync(os.pread, fd, n, offset)
                except OSError as exc:
                    raise BodyFailed(str(exc)) from exc
                if not piece:
                    raise BodyFailed(f"{os.fsdecode(region.path)} shrank while being sent")
                await self.data(piece)
                offset += len(piece)
                left -= len(piece)
            return region.size
        finally:
            os.close(fd)

    async def finish(self) -> None:
        self.conn.h2_call(self.stream, "end_stream", self.stream.id)
        await self.conn.flush()


class H2Connection:
    """One HTTP/2 connection: a reader task feeding h2, one task per stream answering it."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        handler: Handler,
        metrics: Metrics,
        *,
        client: str,
        prefix: bytes = b"",
        stopping: trio.Event | None = None,
    ) -> None:
        self.stream = stream
        self.handler = handler
        self.metrics = metrics
        self.client = client
        self.prefix = prefix
        self.stopping = stopping if stopping is not None else trio.Event()
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=config)
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            },
        )
        # settings given at construction count as in force: h2 applies the header-list limit
        # to its decoder only on a later change, so set it here
        self.h2.decoder.max_header_list_size = MAX_HEADER_LIST_SIZE
        self.streams: dict[int, _Stream] = {}
        self.send_lock = trio.Lock()
        self.window_opened = trio.Event()
        self.no_streams = trio.Event()
        self.preface_sent = trio.Event()
        self.going_away = False
        self.reset_allowance = float(RESET_BURST)
        self.reset_checked = trio.current_time()
        self.nursery: trio.Nursery | None = None

    # --- helpers the stream tasks use ---------------------------------------------------

    def h2_call(self, stream: _Stream, method: str, *args: Any, **kwargs: Any) -> None:
        if stream.reset:
            raise _StreamGone
        try:
            getattr(self.h2, method)(*args, **kwargs)
        except h2.exceptions.StreamClosedError as exc:
            raise _StreamGone from exc

    async def flush(self) -> None:
        async with self.send_lock:
            data = self.h2.data_to_send()
            if data:
                with trio.fail_after(SEND_TIMEOUT):
                    await self.stream.send_all(data)

    async def window(self, stream: _Stream, want: int) -> int:
        """Wait until the client lets us send on `stream`; how many bytes (≤ want) it may take."""
        with trio.move_on_after(SEND_TIMEOUT):
            while True:
                if stream.reset:
                    raise _StreamGone
                try:
                    open_ = self.h2.local_flow_control_window(stream.id)
                except h2.exceptions.StreamClosedError as exc:
                    raise _StreamGone from exc
                if open_ > 0:
                    return min(want, open_)
                await self.window_opened.wait()
        raise BodyFailed(f"the client opened no flow-control window for {SEND_TIMEOUT:.0f} s")

    def acknowledge(self, stream_id: int, flow: int) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):  # the connection is closing
            self.h2.acknowledge_received_data(flow, stream_id)

    async def informational(self, stream: _Stream, status: int) -> None:
        self.h2_call(stream, "send_headers", stream.id, [(b":status", str(status).encode())])
        await self.flush()

    def _wake_writers(self) -> None:
        self.window_opened.set()
        self.window_opened = trio.Event()

    # --- the connection -----------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._guarded, self._go_away_on_stop)
                await self._guarded(self._start_and_read)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(5) as closing:
                    await self.stream.aclose()
                if closing.cancelled_caught:
                    await trio.aclose_forcefully(self.stream)

    async def _start_and_read(self) -> None:
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        await self.flush()
        self.preface_sent.set()
        await self._read_loop()

    async def _guarded(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run `work`; a connection that broke or stalled ends quietly (inside the nursery, so
        that it is not wrapped in an exception group)."""
        try:
            await work()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass
        except OSError as exc:
            log.debug("HTTP/2 connection from %s: %s", self.client, exc)
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    async def _read_loop(self) -> None:
        data: bytes | bytearray = self.prefix
        while True:
            if data:
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    log.debug("HTTP/2 protocol error from %s: %s", self.client, exc)
                    await self.flush()  # h2 queued the GOAWAY
                    return
                for event in events:
                    if not self._on_event(event):
                        await self.flush()
                        return
                await self.flush()
            idle = not self.streams
            with trio.move_on_after(KEEPALIVE_TIMEOUT if idle else SEND_TIMEOUT) as waiting:
                data = await self.stream.receive_some(READ_SIZE)
            if waiting.cancelled_caught:
                if self.streams:
                    continue  # a stream is still being answered; its own timeouts apply
                self.h2.close_connection(ErrorCodes.NO_ERROR)
                await self.flush()
                return
            if not data:
                return

    def _on_event(self, event: h2.events.Event) -> bool:
        """Handle one event; False when the connection must end."""
        if isinstance(event, h2.events.RequestReceived):
            self._start_stream(event)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            assert event.data is not None and event.flow_controlled_length is not None
            if stream is not None and stream.body is not None:
                stream.body.feed(event.data, event.flow_controlled_length)
            else:
                self.acknowledge(event.stream_id, event.flow_controlled_length)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.ended = True
                if stream.body is not None:
                    stream.body.end()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.reset = True
                stream.scope.cancel()
                if stream.body is not None:
                    stream.body.cut("the client reset the stream")
            if event.remote_reset and not self._allow_reset():
                log.warning("HTTP/2 client %s resets streams too fast: closing", self.client)
                self.h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
                return False
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._wake_writers()
        elif isinstance(event, h2.events.ConnectionTerminated):
            return False
        return True

    def _allow_reset(self) -> bool:
        now = trio.current_time()
        self.reset_allowance = min(
            float(RESET_BURST), self.reset_allowance + (now - self.reset_checked) * RESET_RATE
        )
        self.reset_checked = now
        self.reset_allowance -= 1
        return self.reset_allowance >= 0

    def _start_stream(self, event: h2.events.RequestReceived) -> None:
        assert event.stream_id is not None and event.headers is not None
        stream = _Stream(event.stream_id)
        if self.going_away:
            self.h2.reset_stream(stream.id, ErrorCodes.REFUSED_STREAM)
            return
        pseudo: dict[bytes, bytes] = {}
        headers: dict[str, str] = {}
        for name, value in event.headers:
            if name.startswith(b":"):
                pseudo[name] = value
                continue
            key = name.decode("latin-1")
            val = value.decode("latin-1")
            if key in headers:
                val = headers[key] + ("; " if key == "cookie" else ", ") + val
            headers[key] = val
        if b":authority" in pseudo and "host" not in headers:
            headers["host"] = pseudo[b":authority"].decode("latin-1")
        body: RequestBody = EMPTY_BODY
        if event.stream_ended is None:
            # DATA may follow in this very read: the body must exist before the task runs
            text = headers.get("content-length", "")
            length = int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None
            expects = headers.get("expect", "").lower() == "100-continue"
            stream.body = H2RequestBody(self, stream, length, expects)
            body = stream.body
        else:
            stream.ended = True
        method = pseudo.get(b":method", b"").decode("latin-1")
        path, _, query = pseudo.get(b":path", b"").decode("latin-1").partition("?")
        request = Request(method, path, query, headers, self.client, body)
        self.streams[stream.id] = stream
        self.no_streams = trio.Event()
        assert self.nursery is not None
        self.nursery.start_soon(self._serve, stream, request)

    async def _serve(self, stream: _Stream, request: Request) -> None:
        try:
            with stream.scope:
                await self._answer(stream, request)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            assert self.nursery is not None
            self.nursery.cancel_scope.cancel()  # the connection is gone
        except _StreamGone:
            pass
        finally:
            if stream.body is not None:
                stream.body.release()
            self.streams.pop(stream.id, None)
            if not self.streams:
                self.no_streams.set()

    async def _answer(self, stream: _Stream, request: Request) -> None:
        exchange = Exchange(self.metrics, self.client, request.method, request.raw_path, "HTTP/2")
        try:
            await self._answer_exchange(stream, request, exchange)
        finally:
            exchange.close()

    async def _answer_exchange(self, stream: _Stream, request: Request, exchange: Exchange) -> None:
        if not request.raw_path.startswith("/"):
            resp = error(400, "request target must be a path")
        else:
            resp = await respond(self.handler, request)
        try:
            await deliver(H2Sink(self, stream), resp, exchange, head_only=request.method == "HEAD")
        except BodyFailed as exc:
            log.debug("resetting stream %d for %s: %s", stream.id, self.client, exc)
            self.h2_call(stream, "reset_stream", stream.id, ErrorCodes.INTERNAL_ERROR)
            await self.flush()
            return
        if not stream.ended:
            # answered before the request body ended: tell the client to stop sending it
            self.h2_call(stream, "reset_stream", stream.id, ErrorCodes.NO_ERROR)
            await self.flush()

    async def _go_away_on_stop(self) -> None:
        """On shutdown: refuse new streams, finish the running ones, then GOAWAY and close.

        The GOAWAY goes last: clients built on h2 (httpx) cannot read a response that follows it.
        A refused stream (REFUSED_STREAM) is one a client may safely retry elsewhere."""
        await self.stopping.wait()
        await self.preface_sent.wait()  # a GOAWAY may not precede our SETTINGS
        self.going_away = True
        if self.streams:
            await self.no_streams.wait()
        self.h2.close_connection(ErrorCodes.NO_ERROR)
        await self.flush()
