import pytest

from cache.transport.h1codec import (
    BadRequest,
    ChunkedDecoder,
    find_head_end,
    origin_form,
    parse_head,
    write_head,
)


@pytest.mark.parametrize(
    ("raw", "method", "target", "keep_alive", "has_body"),
    [
        (b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n", "GET", "/nix-cache-info", True, False),
        (
            b"HEAD /a.narinfo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "HEAD",
            "/a.narinfo",
            False,
            False,
        ),
        (b"GET / HTTP/1.0\r\n\r\n", "GET", "/", False, False),
        (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", "GET", "/", True, False),
        (b"\r\nGET /x?y=1 HTTP/1.1\nHost: x\n\n", "GET", "/x?y=1", True, False),
        (b"PUT /nar/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n", "PUT", "/nar/x", False, True),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", "POST", "/", False, True),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", "GET", "/", True, False),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\n", "GET", "/", False, True),
    ],
)
def test_valid_heads(raw: bytes, method: str, target: str, keep_alive: bool, has_body: bool) -> None:
    head = parse_head(raw)
    assert (head.method, head.target, head.keep_alive, head.has_body) == (
        method,
        target,
        keep_alive,
        has_body,
    )


def test_headers_are_lower_case_and_joined() -> None:
    head = parse_head(
        b"GET / HTTP/1.1\r\nHost: x\r\nAccept-Encoding: zstd\r\naccept-encoding:  gzip \r\n\r\n"
    )
    assert head.headers["accept-encoding"] == "zstd, gzip"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"\r\n\r\n", 400),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 400),
        (b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
        (b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431),
    ],
)
def test_bad_heads(raw: bytes, status: int) -> None:
    with pytest.raises(BadRequest) as info:
        parse_head(raw)
    assert info.value.status == status


def test_find_head_end() -> None:
    assert find_head_end(b"GET / HTTP/1.1\r\nHost: x\r\n") == -1
    raw = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nNEXT"
    assert raw[find_head_end(raw) :] == b"NEXT"
    assert find_head_end(b"GET / HTTP/1.0\n\nX") == len(b"GET / HTTP/1.0\n\n")


def test_write_head() -> None:
    assert write_head(404, [("Content-Length", "0")], close=True) == (
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    with pytest.raises(ValueError, match=r"unsafe header"):
        write_head(200, [("Location", "/x\r\nSet-Cookie: a")], close=False)


def test_body_framing_fields() -> None:
    head = parse_head(b"PUT /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-Continue\r\n\r\n")
    assert (head.body_length, head.chunked, head.expects_continue, head.persistent) == (5, False, True, True)
    head = parse_head(
        b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    assert (head.body_length, head.chunked, head.persistent) == (None, True, False)
    head = parse_head(b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked, br\r\n\r\n")
    assert head.has_body and not head.chunked  # not framed by us: the read fails, the connection closes


def test_origin_form() -> None:
    assert origin_form("http://host:80/a/b?c=d") == "/a/b?c=d"
    assert origin_form("HTTPS://host") == "/"
    assert origin_form("/plain?x") == "/plain?x"
    assert origin_form("*") == "*"


def test_chunked_decoder_in_pieces() -> None:
    wire = b"4\r\nWiki\r\n5;x=y\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nT: v\r\n\r\nNEXT"
    dec = ChunkedDecoder()
    buf = bytearray()
    out = bytearray()
    for byte in wire:  # one byte at a time: every state must wait for more input correctly
        buf.append(byte)
        while True:
            got = dec.decode(buf, 3)
            if got is None or got == b"":
                break
            out += got
        if dec.done:
            break
    assert bytes(out) == b"Wikipedia in\r\n\r\nchunks."
    assert dec.done and dec.decode(buf, 10) == b""


@pytest.mark.parametrize("wire", [b"zz\r\n", b"4\r\nabcdX\r\n", b"1" * 5000])
def test_chunked_decoder_refuses_bad_framing(wire: bytes) -> None:
    def drain() -> None:
        dec = ChunkedDecoder()
        buf = bytearray(wire)
        while dec.decode(buf, 100):
            pass

    with pytest.raises(BadRequest):
        drain()


def test_remembered_header_lines_parse_as_the_first_time_and_bad_ones_are_never_remembered() -> None:
    good = b"GET /a HTTP/1.1\r\nHost: x\r\nUser-Agent: curl/8 Nix/2.26\r\n\r\n"
    first, again = parse_head(good), parse_head(good)
    assert first.headers == again.headers == {"host": "x", "user-agent": "curl/8 Nix/2.26"}
    bad = b"GET /a HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n"
    for _ in range(2):  # refused both times: a refused line is not in the memo
        with pytest.raises(BadRequest):
            parse_head(bad)
