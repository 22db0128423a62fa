"""The HTTP/2 server over an in-memory stream, driven by a raw h2 client: request bodies,
100-continue, unread bodies, short bodies, flow control, resets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio
import trio.testing
from h2.errors import ErrorCodes

from cache.metrics import Metrics
from cache.transport.delivery import Handler
from cache.transport.h2server import H2Connection
from cache.transport.messages import Request, Response, StreamBody, text
from tests.support.h2client import H2Client

Run = Callable[[H2Client], Awaitable[None]]


@asynccontextmanager
async def connected(handler: Handler, **client_kw: object) -> AsyncIterator[H2Client]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    conn = H2Connection(server_stream, handler, Metrics(1), client="test")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            client = H2Client(client_stream, **client_kw)  # type: ignore[arg-type]
            await client.start()
            yield client
            nursery.cancel_scope.cancel()


async def echo(request: Request) -> Response:
    data = bytearray()
    while chunk := await request.body.receive():
        data += chunk
    return text(
        200, f"{request.method} {request.raw_path} {request.body.length} {len(data)} {data[:20].decode()}"
    )


async def refuse(request: Request) -> Response:
    return text(413, "too big")


async def test_get_and_head() -> None:
    async with connected(echo) as client:
        rec = await client.get("/x?y=1")
        assert rec.status == 200 and rec.ended and bytes(rec.data) == b"GET /x 0 0 "
        assert rec.headers["content-length"] == str(len(rec.data))
        head = await client.get("/x", method="HEAD")
        assert head.status == 200 and head.data == b"" and head.ended


async def test_request_body_read_whole() -> None:
    body = b"n" * 700_000  # more than the windows we grant: the route's reads open them
    async with connected(echo) as client:
        sid = await client.request(
            "/push", method="PUT", headers=[("content-length", str(len(body)))], end=False
        )
        sent = 0
        while sent < len(body):
            window = client.conn.local_flow_control_window(sid)
            if window == 0:
                await client.pump()
                continue
            piece = body[sent : sent + min(window, 16384)]
            await client.send_body(sid, piece, end=sent + len(piece) == len(body))
            sent += len(piece)
        rec = await client.wait(sid)
        assert rec.status == 200
        assert bytes(rec.data).startswith(b"PUT /push 700000 700000 nnn")


async def test_expect_continue_only_when_read() -> None:
    async with connected(echo) as client:
        sid = await client.request(
            "/push", method="PUT", headers=[("content-length", "3"), ("expect", "100-continue")], end=False
        )
        while not client.streams[sid].informational:
            await client.pump()
        assert client.streams[sid].informational == [100]
        await client.send_body(sid, b"abc", end=True)
        rec = await client.wait(sid)
        assert rec.status == 200 and b"3 3 abc" in rec.data
    async with connected(refuse) as client:
        sid = await client.request(
            "/push", method="PUT", headers=[("content-length", "3"), ("expect", "100-continue")], end=False
        )
        rec = await client.wait(sid)
        assert rec.status == 413 and rec.informational == []
        # answered before the body came: the rest of the request stream is reset, NO_ERROR
        while rec.reset is None and await client.pump():
            pass
        assert rec.ended and rec.reset == ErrorCodes.NO_ERROR


async def test_reset_during_the_request_body_stops_the_route() -> None:
    stopped = trio.Event()

    async def reader(request: Request) -> Response:
        try:
            while await request.body.receive():
                pass
        finally:
            stopped.set()  # cancelled: nobody is left to answer
        return text(200, "whole")

    async with connected(reader) as client:
        sid = await client.request(
            "/push", method="PUT", headers=[("content-length", "10")], body=b"abc", end=False
        )
        await client.reset(sid)
        with trio.fail_after(5):
            await stopped.wait()


async def test_body_longer_than_its_content_length_ends_the_connection() -> None:
    async with connected(echo) as client:  # h2 itself refuses a body that disagrees with its length
        await client.request("/push", method="PUT", headers=[("content-length", "2")], body=b"abc")
        while await client.pump():
            pass
        assert client.terminated == ErrorCodes.PROTOCOL_ERROR


async def _short() -> AsyncIterator[bytes]:
    yield b"12345"


async def test_short_body_resets_the_stream_and_closes_the_iterator() -> None:
    closed: list[bool] = []

    async def close() -> None:
        closed.append(True)

    async def short(request: Request) -> Response:
        return Response(200, [], StreamBody(_short, 10, close))

    async with connected(short) as client:
        rec = await client.get("/")
        assert rec.status == 200 and rec.headers["content-length"] == "10"
        assert not rec.ended and rec.reset == ErrorCodes.INTERNAL_ERROR
        assert bytes(rec.data) == b"12345"
        assert closed == [True]
        again = await client.get("/")  # the connection itself is fine
        assert again.reset == ErrorCodes.INTERNAL_ERROR


async def test_body_produced_only_as_the_window_opens() -> None:
    produced = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(1000):
            produced += 16384
            yield b"z" * 16384

    async def big(request: Request) -> Response:
        return Response(200, [], StreamBody(chunks, 1000 * 16384))

    async with connected(big, window=16384, auto_ack=False) as client:
        sid = await client.request("/")
        for _ in range(20):
            with trio.move_on_after(0.05):
                await client.pump()
        rec = client.streams[sid]
        assert rec.received <= 65535  # the connection window: nothing more was sent
        assert produced <= 65535 + 2 * 16384  # …and hardly more was produced
        await client.reset(sid)


async def test_reset_stops_production_and_closes() -> None:
    finished = trio.Event()

    async def endless() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"y" * 65536
        finally:
            finished.set()

    async def handler(request: Request) -> Response:
        return Response(200, [], StreamBody(endless, None))

    async with connected(handler, auto_ack=False) as client:
        sid = await client.request("/")
        while client.streams[sid].status is None:
            await client.pump()
        await client.reset(sid)
        with trio.fail_after(5):
            await finished.wait()


async def test_rapid_resets_close_the_connection() -> None:
    async def slow(request: Request) -> Response:
        await trio.sleep(1)
        return text(200, "late")

    async with connected(slow) as client:
        for _ in range(400):
            if client.terminated is not None or client.closed:
                break
            sid = await client.request("/")
            await client.reset(sid)
            with trio.move_on_after(0):
                await client.pump()
        while client.terminated is None and await client.pump():
            pass
        assert client.terminated == ErrorCodes.ENHANCE_YOUR_CALM


async def test_shutdown_finishes_running_streams_then_goes_away() -> None:
    stopping = trio.Event()

    async def slow(request: Request) -> Response:
        stopping.set()  # shutdown begins while this request is being answered
        await trio.sleep(0.2)
        return text(200, "finished")

    client_stream, server_stream = trio.testing.memory_stream_pair()
    conn = H2Connection(server_stream, slow, Metrics(1), client="test", stopping=stopping)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            client = H2Client(client_stream)
            await client.start()
            rec = await client.get("/")
            assert rec.status == 200 and rec.ended and bytes(rec.data) == b"finished"
            while await client.pump():
                pass
            assert client.terminated == ErrorCodes.NO_ERROR  # GOAWAY, then the connection closed


async def test_oversized_header_list_ends_the_connection_not_the_server() -> None:
    async with connected(echo) as client:
        ok = await client.get("/first")  # our SETTINGS (32 KiB header lists) are acknowledged by now
        assert ok.status == 200
        await client.request("/big", headers=[("x-big", "a" * 40_000)])
        while await client.pump():
            pass
        assert client.terminated is not None and client.terminated != ErrorCodes.NO_ERROR
