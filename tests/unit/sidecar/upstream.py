"""A real HTTP upstream for the sidecar's tests (trio + h11), echoing what reached it.

- ``GET /big/<n>``: ``n`` bytes of ``x``, streamed in 64 KiB writes;
- ``GET /status/<code>``: that status;
- anything else: JSON ``{"method", "path", "headers", "body_bytes"}`` (headers lower-cased,
  repeated ones joined with ", "); request bodies are counted, not kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import h11
import trio

CHUNK = b"x" * 65536


@dataclass
class Echo:
    port: int = 0
    seen: list[dict[str, object]] = field(default_factory=list)

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._connection, listeners)
            task_status.started(self.port)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, size = None, 0
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        conn.receive_data(bytes(data))
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        size += len(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                assert request is not None
                await self._respond(stream, conn, request, size)
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            return
        finally:
            await stream.aclose()

    async def _respond(
        self, stream: trio.SocketStream, conn: h11.Connection, request: h11.Request, size: int
    ) -> None:
        path = request.target.decode()
        if path.startswith("/big/"):
            n = int(path.split("/")[2])
            await stream.send_all(
                conn.send(
                    h11.Response(
                        status_code=200,
                        headers=[("Content-Length", str(n)), ("Content-Type", "application/octet-stream")],
                    )
                )
            )
            left = n
            while left:
                piece = CHUNK[: min(left, len(CHUNK))]
                await stream.send_all(conn.send(h11.Data(data=piece)))
                left -= len(piece)
            await stream.send_all(conn.send(h11.EndOfMessage()))
            return
        status = 200
        if path.startswith("/status/"):
            status = int(path.split("/")[2])
        headers: dict[str, str] = {}
        for k, v in request.headers:
            name = k.decode().lower()
            headers[name] = f"{headers[name]}, {v.decode()}" if name in headers else v.decode()
        record = {"method": request.method.decode(), "path": path, "headers": headers, "body_bytes": size}
        self.seen.append(record)
        body = json.dumps(record).encode()
        await stream.send_all(
            conn.send(
                h11.Response(
                    status_code=status,
                    headers=[("Content-Length", str(len(body))), ("Content-Type", "application/json")],
                )
            )
        )
        await stream.send_all(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
