"""The one body writer both servers use: a `Response` onto a protocol's `Sink`, checked and recorded.

Rules, the same for HTTP/1.1 and HTTP/2:
- the body is iterated piece by piece (bytes, file regions, async chunks), never gathered;
- the bytes sent must equal the announced length: a body that ends short, runs long or fails
  raises `BodyFailed` after the head went out, and the protocol cuts the message (HTTP/1.1
  closes the connection, HTTP/2 resets the stream); it is never completed as if whole;
- a `StreamBody`'s iterator and its `close` hook are always closed, whatever happened;
- every exchange is counted in the metrics and written to the access log once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Protocol

import trio

from ..metrics import Metrics
from ..nar import FileRegion, NarError, Segment
from ..store import StoreError
from .messages import Request, RequestBodyError, Response, SegmentsBody, StreamBody, error

log = logging.getLogger("harmonia.http")
access_log = logging.getLogger("harmonia.access")

Handler = Callable[[Request], Awaitable[Response]]
_done = object()


class BodyFailed(Exception):
    """The body could not be sent whole after the head went out: cut the message."""


class Sink(Protocol):
    """How one protocol puts one response on the wire."""

    async def start(self, resp: Response, length: int | None, *, head_only: bool) -> None:
        """Queue the response head (`length` None: unframed); the message ends there if head_only."""
        ...

    async def data(self, chunk: bytes) -> None: ...

    async def region(self, region: FileRegion) -> int:
        """Send a file region's bytes; returns how many were sent. Raises BodyFailed on errors."""
        ...

    async def finish(self) -> None:
        """End a message whose body was sent whole."""
        ...


async def respond(handler: Handler, request: Request) -> Response:
    """The handler's answer; a fault of ours is a logged 500, a broken request body a 400."""
    try:
        return await handler(request)
    except RequestBodyError as exc:
        return error(400, f"bad request body: {exc}")
    except Exception:
        log.exception("internal error on %s %s", request.method, request.raw_path)
        return error(500, "internal server error (logged)")


class Exchange:
    """One request/response pair, for the metrics and the access log."""

    __slots__ = ("client", "closed", "method", "metrics", "path", "protocol", "sent", "started")

    def __init__(self, metrics: Metrics, client: str, method: str, path: str, protocol: str) -> None:
        self.metrics = metrics
        self.client = client
        self.method = method
        self.path = path
        self.protocol = protocol
        self.sent = 0  # body bytes handed to the transport so far (a cut transfer counts what went)
        self.started = time.monotonic()
        self.closed = False
        metrics.exchange_opened()

    def close(self) -> None:
        """The exchange is over, answered or not (the transports call it in a `finally`)."""
        if not self.closed:
            self.closed = True
            self.metrics.exchange_closed()

    def record(self, route: str, status: int, sent: int) -> None:
        self.close()
        elapsed = time.monotonic() - self.started
        self.metrics.observe(route, status, elapsed, sent)
        if access_log.isEnabledFor(logging.DEBUG):
            access_log.debug(
                "%s %s %s %s %d %d %.1fms",
                self.client,
                self.method,
                self.path,
                self.protocol,
                status,
                sent,
                elapsed * 1000,
            )


async def deliver(sink: Sink, resp: Response, exchange: Exchange, *, head_only: bool) -> int:
    """Send `resp` through `sink`; returns the body bytes sent. Raises BodyFailed (cut it) or the
    sink's own transport errors (connection gone). What was sent is recorded either way."""
    body = resp.body
    try:
        await sink.start(resp, resp.content_length, head_only=head_only)
        if head_only:
            return 0
        if isinstance(body, bytes):
            if body:
                await sink.data(body)
            exchange.sent = len(body)
        else:
            is_nar = resp.route == "nar"
            if is_nar:
                exchange.metrics.nar_started()
            try:
                if isinstance(body, SegmentsBody):
                    await _write_segments(sink, body, exchange)
                else:
                    await _write_stream(sink, body, exchange)
            finally:
                if is_nar:
                    exchange.metrics.nar_finished()
        await sink.finish()
        return exchange.sent
    finally:
        if isinstance(body, StreamBody) and body.close is not None:
            with trio.CancelScope(shield=True):
                await body.close()
        exchange.record(resp.route, resp.status, exchange.sent)


async def _write_segments(sink: Sink, body: SegmentsBody, progress: Exchange) -> None:
    it: Iterator[Segment] = body.segments()
    while True:
        try:
            # building segments walks the filesystem: never on the event loop
            seg = await trio.to_thread.run_sync(next, it, _done)
        except (NarError, OSError) as exc:
            log.error("body failed after %d bytes: %s", progress.sent, exc)
            raise BodyFailed(str(exc)) from exc
        if seg is _done:
            break
        if isinstance(seg, bytes):
            if seg:
                await sink.data(seg)
                progress.sent += len(seg)
            continue
        assert isinstance(seg, FileRegion)
        progress.sent += await sink.region(seg)
        if progress.sent > body.length:
            break
    if progress.sent != body.length:
        log.error("body was %d bytes, announced %d: cutting it", progress.sent, body.length)
        raise BodyFailed(f"body was {progress.sent} bytes, announced {body.length}")


async def _write_stream(sink: Sink, body: StreamBody, progress: Exchange) -> None:
    stream: AsyncIterator[bytes] = body.chunks()
    try:
        async for chunk in stream:
            if not chunk:
                continue
            if body.length is not None and progress.sent + len(chunk) > body.length:
                raise BodyFailed(f"streamed body runs past its {body.length} bytes")
            await sink.data(chunk)
            progress.sent += len(chunk)
    except (NarError, OSError, StoreError) as exc:
        log.error("streamed body failed after %d bytes: %s", progress.sent, exc)
        raise BodyFailed(str(exc)) from exc
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            with trio.CancelScope(shield=True):
                await aclose()
    if body.length is not None and progress.sent != body.length:
        log.error("streamed body was %d bytes, announced %d: cutting it", progress.sent, body.length)
        raise BodyFailed(f"body was {progress.sent} bytes, announced {body.length}")
