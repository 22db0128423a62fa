"""The cutting proxy's request parsing: heads taken off a stream in pieces, header look-up."""

from __future__ import annotations

from tests.support.cutting_proxy import header, request_heads


def test_request_heads_come_off_the_front_as_they_complete() -> None:
    buffer = bytearray(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /nar/b.nar HTTP/1.1\r\nRange: bytes=5-\r\n")
    assert request_heads(buffer) == ["GET /a HTTP/1.1\r\nHost: x"]
    assert buffer == b"GET /nar/b.nar HTTP/1.1\r\nRange: bytes=5-\r\n"
    buffer += b"\r\n"
    (head,) = request_heads(buffer)
    assert buffer == b""
    assert header(head, "range") == "bytes=5-"
    assert header(head, "RANGE") == "bytes=5-"
    assert header(head, "accept-encoding") is None
    assert request_heads(buffer) == []


def test_header_ignores_the_request_line() -> None:
    assert header("GET /x: HTTP/1.1\r\nA: 1", "get /x") is None
    assert header("GET / HTTP/1.1\r\nAccept-Encoding:  zstd, br ", "accept-encoding") == "zstd, br"
