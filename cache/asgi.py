"""HTTP/2 through hypercorn: our routes as an ASGI app, and the hand-over of a connection.

The server accepts every connection itself; those that speak HTTP/2 (h2c prior knowledge, or
ALPN `h2` over TLS) are passed to hypercorn's connection handler, with any bytes we already read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app

from .http import Request, SegmentsBody, StreamBody
from .nar import FileRegion, NarError, read_region

if TYPE_CHECKING:
    from .app import App

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_done = object()
access_log = logging.getLogger("harmonia.access")


class AsgiApp:
    """Our routes as an ASGI application (used for HTTP/2, and usable under any ASGI server)."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        started = time.monotonic()
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            key = name.decode("latin-1").lower()
            val = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {val}" if key in headers else val
        client = scope.get("client") or ("", 0)
        request = Request(
            scope["method"],
            scope.get("raw_path", b"").decode("ascii", "replace") or scope["path"],
            scope.get("query_string", b"").decode("ascii", "replace"),
            headers,
            str(client[0]),
        )
        resp = await self.app.handle(request)
        out_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers]
        if resp.content_length is not None:
            out_headers.append((b"content-length", str(resp.content_length).encode()))
        await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
        sent = 0
        body = resp.body
        try:
            if request.method == "HEAD":
                pass
            elif isinstance(body, bytes):
                await send({"type": "http.response.body", "body": body, "more_body": True})
                sent = len(body)
            elif isinstance(body, SegmentsBody):
                it = body.segments()
                while True:
                    seg = await trio.to_thread.run_sync(next, it, _done)
                    if seg is _done:
                        break
                    if isinstance(seg, bytes):
                        await send({"type": "http.response.body", "body": seg, "more_body": True})
                        sent += len(seg)
                        continue
                    assert isinstance(seg, FileRegion)
                    chunks = read_region(seg)
                    while True:
                        # file reads happen in a thread: a cold page cache must not stall the loop
                        chunk = await trio.to_thread.run_sync(next, chunks, _done)
                        if chunk is _done:
                            break
                        assert isinstance(chunk, bytes)
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        sent += len(chunk)
            elif isinstance(body, StreamBody):
                async for chunk in body.chunks():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    sent += len(chunk)
        except (NarError, OSError):
            # the status is out: the only honest signal left is an aborted stream
            raise
        finally:
            elapsed = time.monotonic() - started
            self.app.metrics.observe(resp.route, resp.status, elapsed, sent)
            if access_log.isEnabledFor(logging.DEBUG):
                access_log.debug(
                    "%s %s %s HTTP/%s %d %d %.1fms",
                    request.client,
                    request.method,
                    request.raw_path,
                    scope.get("http_version", "?"),
                    resp.status,
                    sent,
                    elapsed * 1000,
                )
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class ReplayStream(trio.abc.Stream):
    """A socket stream that first yields bytes we already read while detecting the protocol."""

    def __init__(self, stream: trio.SocketStream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix
        self.socket = stream.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            await trio.lowlevel.checkpoint()
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


class Http2Handoff:
    """Runs hypercorn's per-connection server on connections that speak HTTP/2."""

    def __init__(self, app: App) -> None:
        self.config = HypercornConfig()
        self.config.keep_alive_timeout = 75
        self.config.h2_max_concurrent_streams = 100
        self.app_wrapper = wrap_app(AsgiApp(app), self.config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
        self.context = WorkerContext(None)
        self.state: dict[str, Any] = {}

    async def serve(self, stream: trio.abc.Stream) -> None:
        server = TCPServer(self.app_wrapper, self.config, self.context, self.state, stream)  # type: ignore[arg-type]
        await server.run()
