"""The HTTP/1.1 server over an in-memory stream: request bodies, 100-continue, unread bodies,
short response bodies, absolute-form targets and oversized heads."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import trio
import trio.testing

from cache.metrics import Metrics
from cache.nar import FileRegion
from cache.transport.h1server import H1Connection
from cache.transport.messages import Request, RequestBodyError, Response, SegmentsBody, StreamBody, text
from tests.support.standin import h1_exchange


async def echo(request: Request) -> Response:
    """Reads the whole body and answers with it, and with its announced length."""
    data = bytearray()
    while chunk := await request.body.receive(7):
        data += chunk
    return text(200, f"{request.method} {request.raw_path} {request.body.length} {data.decode()}")


async def refuse(request: Request) -> Response:
    """Never reads the body (a 401 or a 413 would)."""
    return text(401, "no")


def statuses(response: bytes) -> list[bytes]:
    return re.findall(rb"HTTP/1\.1 (\d{3}) ", response)


async def test_content_length_body_is_read_and_the_connection_kept() -> None:
    raw = (
        b"PUT /push/x HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world"
        b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    out = await h1_exchange(echo, raw)
    assert b"PUT /push/x 11 hello world" in out
    assert b"GET /next 0 " in out  # the pipelined request after the body is intact
    assert statuses(out) == [b"200", b"200"]


async def test_chunked_body_is_decoded() -> None:
    raw = (
        b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: t\r\n\r\n"
    )
    out = await h1_exchange(echo, raw)
    assert b"POST /p None hello world" in out


async def test_malformed_chunked_body_is_a_400_not_a_500() -> None:
    raw = b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    out = await h1_exchange(echo, raw)
    assert statuses(out) == [b"400"]
    assert b"Connection: close" in out


async def test_cut_request_body_raises_in_the_route() -> None:
    seen: list[str] = []

    async def reader(request: Request) -> Response:
        try:
            while await request.body.receive():
                pass
        except RequestBodyError as exc:
            seen.append(str(exc))
            return text(400, "cut")
        return text(200, "whole")

    out = await h1_exchange(reader, b"PUT /p HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly this")
    assert statuses(out) == [b"400"]
    assert seen and "9 of 100" in seen[0]


async def test_expect_continue_is_sent_only_when_the_route_reads() -> None:
    head = b"PUT /p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    out = await h1_exchange(echo, head + b"abc" + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert statuses(out) == [b"100", b"200", b"200"]
    out = await h1_exchange(refuse, head)
    assert statuses(out) == [b"401"]  # no 100: the client never sends the body
    assert b"Connection: close" in out


async def test_unread_large_body_closes_the_connection_small_one_is_drained() -> None:
    big = b"PUT /p HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000
    out = await h1_exchange(refuse, big + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert statuses(out) == [b"401"] and b"Connection: close" in out
    small = b"PUT /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    out = await h1_exchange(refuse, small + b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert statuses(out) == [b"401", b"401"]  # drained, and the next request was read correctly


async def test_get_without_body_receives_nothing() -> None:
    out = await h1_exchange(echo, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"GET /x 0 " in out


async def test_absolute_form_target_is_accepted() -> None:
    out = await h1_exchange(
        echo, b"GET http://cache.example:8080/nix-cache-info?a=1 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert statuses(out) == [b"200"]
    assert b"GET /nix-cache-info 0" in out


async def test_head_over_the_limit_in_one_read_is_431() -> None:
    raw = b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 40_000 + b"\r\n\r\n"
    out = await h1_exchange(echo, raw)
    assert statuses(out) == [b"431"]


async def _short() -> AsyncIterator[bytes]:
    yield b"only five"[:5]


async def test_short_stream_body_is_cut_not_completed() -> None:
    closed: list[bool] = []

    async def close() -> None:
        closed.append(True)

    async def short(request: Request) -> Response:
        return Response(200, [("Content-Type", "text/plain")], StreamBody(_short, 10, close))

    metrics = Metrics(1)
    out = await h1_exchange(short, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", metrics=metrics)
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"Content-Length: 10" in head
    assert body == b"only " and len(body) < 10  # the connection ended short: the client sees it
    assert closed == [True]
    assert 'harmonia_requests_total{route="other",status="200"} 1' in metrics.render()


async def test_short_file_body_is_cut(tmp_path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"12345")

    async def short(request: Request) -> Response:
        region = FileRegion(bytes(path), 10)  # the file is shorter than announced
        return Response(200, [], SegmentsBody(lambda: iter([region]), 10))

    out = await h1_exchange(short, b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert statuses(out) == [b"200"]  # cut: no second answer on this connection
    assert out.endswith(b"12345")


async def test_stream_iterator_closed_when_the_client_goes() -> None:
    finished = trio.Event()

    async def endless() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x" * 65536
        finally:
            finished.set()

    async def handler(request: Request) -> Response:
        return Response(200, [], StreamBody(endless, None))

    client, server = trio.testing.memory_stream_pair()
    conn = H1Connection(server, handler, Metrics(1), sock=None, client="test")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            await client.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await client.receive_some(1000)
            await client.aclose()
            await finished.wait()
