"""Hostile input: malformed paths, encodings, headers and ranges. No 5xx, no byte from outside the store."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cache_server import CacheServer, start_cache
from tests.support.fixtures import Fixtures

pytestmark = pytest.mark.e2e

SECRET_MARK = b"root:"  # /etc/passwd's first line


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, nix_daemon_env: dict[str, str]) -> Iterator[CacheServer]:
    with start_cache(tmp_path_factory.mktemp("hostile")) as srv:
        yield srv


def raw_request(server: CacheServer, data: bytes, read_all: bool = True) -> bytes:
    host, port = server.hostport.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if not read_all:
                break
        return b"".join(chunks)


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response[9:12])


def hostile_targets(fx: Fixtures) -> list[str]:
    h = Path(fx.tree).name[:32]
    d = Path(fx.dep).name[:32]
    return [
        "/../../../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        f"/serve/{h}/../../../etc/passwd",
        f"/serve/{h}/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        f"/serve/{h}/dir/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc/passwd",
        f"/serve/{h}/dangling",
        f"/serve/{h}/%00",
        f"/serve/{h}/dir/..%5c..%5cetc",
        "/serve/" + "x" * 32 + "/etc/passwd",
        "/serve/../../etc/passwd",
        "/serve/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/log/../../../../etc/passwd",
        "/log/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/log/" + "0" * 32 + "-x.drv%00",
        "/" + "e" * 32 + ".narinfo",
        "/" + "A" * 32 + ".narinfo",
        "/" + "0" * 31 + ".narinfo",
        "/" + "0" * 33 + ".narinfo",
        "/%30" * 32 + ".narinfo",
        "/" + "0" * 5000 + ".narinfo",
        f"/{h}.narinfo/../../etc/passwd",
        "/nar/" + "0" * 52 + ".nar",
        "/nar/" + "0" * 52 + ".nar?hash=../../etc/passwd",
        "/nar/" + "0" * 52 + f".nar?hash={h}&hash=zzz",
        "/nar/../../etc/passwd.nar",
        f"/nar/{h}-{'z' * 52}.nar",
        f"/nar/{h}-../../etc.nar",
        "/nar/" + "0" * 52 + ".nar.zst?hash=" + d,
        f"/{h}.ls?%%%",
        "/?" + "a=" * 1000,
        "/%ff%fe.narinfo",
        "/\u00e9".encode().decode("latin-1"),
    ]


def test_no_5xx_and_nothing_from_outside(server: CacheServer, store_fixtures: Fixtures) -> None:
    for target in hostile_targets(store_fixtures):
        raw = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode("latin-1")
        response = raw_request(server, raw)
        status = status_of(response)
        assert status < 500, (target, response[:300])
        assert SECRET_MARK not in response, target


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 100_000 + b"\r\n\r\n",
        b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
        b"PUT /nar/x.nar HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: <script>\r\n\r\n",
    ],
)
def test_malformed_requests_get_4xx(server: CacheServer, raw: bytes) -> None:
    status = status_of(raw_request(server, raw))
    assert 400 <= status < 500


def test_broken_body_on_a_get_is_never_a_5xx(server: CacheServer) -> None:
    # a GET's body is never read; the answer may be 200 or 4xx, and the connection then closes
    raw = b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    assert status_of(raw_request(server, raw)) < 500
    raw = b"GET /nix-cache-info HTTP/1.1\r\nHost: \xff\xfe\r\nAccept-Encoding: \xff;q=x\r\n\r\n"
    assert status_of(raw_request(server, raw)) < 500


def test_future_http_version_gets_an_http11_answer(server: CacheServer) -> None:
    # RFC 9110 lets a server answer a higher minor/major version in HTTP/1.1; never a 5xx
    response = raw_request(server, b"GET /nix-cache-info HTTP/9.9\r\nHost: x\r\n\r\n")
    assert status_of(response) < 500


@pytest.mark.parametrize(
    "range_header",
    [
        "bytes=abc",
        "bytes=-0",
        "bytes=99999999999999999999-",
        "bytes=5-1",
        "bytes=0-0,1-1,2-2",
        "bytes=" + "1" * 5000 + "-",
        "lines=1-2",
        "bytes=--1",
        "bytes=1--2",
    ],
)
def test_malformed_ranges(server: CacheServer, store_fixtures: Fixtures, range_header: str) -> None:
    h = Path(store_fixtures.single).name[:32]
    raw = raw_request(server, f"GET /{h}.narinfo HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    narhash = raw.split(b"NarHash: sha256:")[1][:52].decode()
    target = f"/nar/{narhash}.nar?hash={h}"
    req = f"GET {target} HTTP/1.1\r\nHost: x\r\nRange: {range_header}\r\nConnection: close\r\n\r\n"
    status = status_of(raw_request(server, req.encode()))
    assert status in (200, 206, 416)


def test_server_still_serves_after_abuse(server: CacheServer) -> None:
    raw = raw_request(server, b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(raw) == 200
    assert server.proc.poll() is None
    assert "Traceback" not in server.log


def test_pipelined_requests_are_answered_in_order(server: CacheServer) -> None:
    raw = (
        b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n"
        b"HEAD /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    response = raw_request(server, raw)
    assert response.count(b"HTTP/1.1 200 OK") == 3
    assert response.index(b"harmonia-cache 0") < response.rindex(b"StoreDir: /nix/store")
    assert response.count(b"StoreDir:") == 1  # the HEAD answer has no body


def test_http10_without_keep_alive_closes(server: CacheServer) -> None:
    response = raw_request(server, b"GET /nix-cache-info HTTP/1.0\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 200 OK")
    assert b"Connection: close" in response
    assert response.endswith(b"Priority: 30\n")


def test_store_path_that_is_a_link_outside_is_not_followed(
    server: CacheServer, nix_daemon_env: dict[str, str]
) -> None:
    """A store path may itself be a symlink (anyone who can add a path can make one to /etc)."""
    from tests.support.nix import build

    evil = build(
        'builtins.derivation { name = "hc-link-to-etc"; system = builtins.currentSystem; '
        'builder = "/bin/sh"; args = [ "-c" "/bin/ln -s /etc $out" ]; }',
        nix_daemon_env,
    )[0]
    h = Path(evil).name[:32]
    for target in (f"/serve/{h}", f"/serve/{h}/", f"/serve/{h}/passwd", f"/serve/{h}/shadow"):
        response = raw_request(
            server, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        assert status_of(response) == 404, (target, response[:300])
        assert SECRET_MARK not in response


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n",
        b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nContent-Length: \xd9\xa3\r\n\r\n",
    ],
)
def test_non_ascii_digits_in_content_length(server: CacheServer, raw: bytes) -> None:
    assert status_of(raw_request(server, raw)) == 400


def test_non_ascii_digits_in_range(server: CacheServer, store_fixtures: Fixtures) -> None:
    h = Path(store_fixtures.single).name[:32]
    raw = raw_request(server, f"GET /{h}.narinfo HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    narhash = raw.split(b"NarHash: sha256:")[1][:52].decode()
    req = f"GET /nar/{narhash}.nar?hash={h} HTTP/1.1\r\nHost: x\r\nRange: bytes=\xb2-\r\nConnection: close\r\n\r\n"
    assert status_of(raw_request(server, req.encode("latin-1"))) == 200


def test_head_over_the_limit_in_one_read_is_431(server: CacheServer) -> None:
    # 40 KB arrive in one read: the 32 KiB limit holds for the head, not only across reads
    raw = b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 40_000 + b"\r\n\r\n"
    assert status_of(raw_request(server, raw)) == 431


def test_absolute_form_target_is_served(server: CacheServer) -> None:
    # RFC 9112 §3.2.2: a server must accept the absolute form (proxies and some clients send it)
    raw = b"GET http://cache.example/nix-cache-info HTTP/1.1\r\nHost: cache.example\r\nConnection: close\r\n\r\n"
    response = raw_request(server, raw)
    assert status_of(response) == 200 and b"StoreDir: /nix/store" in response


def test_unread_upload_body_gets_an_answer_then_close(server: CacheServer) -> None:
    # a body the cache does not take: answered (405), the connection closed, never a hang or 5xx
    raw = b"PUT /x.narinfo HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n" + b"x" * 100_000
    response = raw_request(server, raw)
    assert status_of(response) == 405 and b"Connection: close" in response
