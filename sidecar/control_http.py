"""A small HTTP/1.1 client and server on trio streams (h11), for local control sockets only.

The client talks to Caddy's admin API (a unix socket); the server answers
``/health``, ``/status`` and ``/metrics`` on the sidecar's own socket or loopback address, and
``/whois`` (the engine's per-request identity lookup) on the socket only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h11
import trio

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024 * 1024


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


async def request_unix(
    path: str, method: str, target: str, body: bytes | None = None, content_type: str = "application/json"
) -> Response:
    """One request over a unix socket (``Connection: close``); raises OSError on failure.
    Callers bound it with ``trio.fail_after``."""
    stream = await trio.open_unix_socket(path)
    async with stream:
        try:
            return await _exchange(stream, method, target, body, content_type)
        except (h11.ProtocolError, trio.BrokenResourceError) as exc:
            raise OSError(f"{method} {target} on {path}: {exc}") from None


async def request_tcp(host: str, port: int, method: str, target: str, body: bytes | None = None) -> Response:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        try:
            return await _exchange(stream, method, target, body, "application/json")
        except (h11.ProtocolError, trio.BrokenResourceError) as exc:
            raise OSError(f"{method} {target} on {host}:{port}: {exc}") from None


async def _exchange(
    stream: trio.abc.Stream, method: str, target: str, body: bytes | None, content_type: str
) -> Response:
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", "localhost"), ("Connection", "close")]
    if body is not None:
        headers += [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    data = conn.send(h11.Request(method=method, target=target, headers=headers))
    if body is not None:
        data += conn.send(h11.Data(data=body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)
    status, resp_headers, chunks = 0, {}, []
    size = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            resp_headers = {k.decode().lower(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > MAX_BODY:
                raise OSError("response too large")
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return Response(status, b"".join(chunks), resp_headers)


@dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[str, str], Awaitable[Reply]]


async def serve_connection(stream: trio.abc.Stream, handler: Handler) -> None:
    """Serve one connection: GET/HEAD requests, answered by ``handler(method, target)``."""
    conn = h11.Connection(h11.SERVER)
    try:
        with trio.move_on_after(30):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    chunk = bytes(await stream.receive_some(65536))
                    conn.receive_data(chunk)
                    if not chunk and conn.their_state is not h11.DONE:
                        return
                    continue
                if isinstance(event, h11.Request):
                    method = event.method.decode()
                    target = event.target.decode()
                    if method not in ("GET", "HEAD"):
                        reply = Reply(405, "text/plain", b"method not allowed\n")
                    else:
                        reply = await handler(method, target)
                    headers = [
                        *reply.headers,
                        ("Content-Type", reply.content_type),
                        ("Content-Length", str(len(reply.body))),
                        ("Connection", "close"),
                    ]
                    out = conn.send(h11.Response(status_code=reply.status, headers=headers))
                    if method != "HEAD":
                        out += conn.send(h11.Data(data=reply.body))
                    out += conn.send(h11.EndOfMessage())
                    await stream.send_all(out)
                    return
                if isinstance(event, h11.ConnectionClosed):
                    return
    except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        await stream.aclose()


async def serve_listeners(
    listeners: list[tuple[trio.SocketListener, Handler]],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve each listener with its own handler."""
    async with trio.open_nursery() as nursery:
        for listener, handler in listeners:
            nursery.start_soon(trio.serve_listeners, lambda s, h=handler: serve_connection(s, h), [listener])
        task_status.started()
