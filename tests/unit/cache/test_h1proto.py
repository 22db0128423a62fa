import pytest

from cache.h1proto import BadRequest, find_head_end, parse_head, write_head


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
