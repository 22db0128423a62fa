"""Push through the public gateway (issue 12's frontends): Debian's Caddy runs the rendered
snippet on loopback in front of upstreams of ours.

- The default snippet never exposes ``/push``: PUT and GET there are 404 and reach nothing.
- ``--expose push`` passes a PUT through to the cache *while it is being sent* (the upstream
  holds the first bytes before the client sends the rest: no request buffering), past the
  general 1 MiB body limit, and a ``Content-Length`` over the push limit is 413 before anything
  is proxied.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from caddy.cli import main as caddy_cli
from caddy.policy import Policy
from tests.e2e.caddy.gateway_support import IO_TIMEOUT, echo_upstream, refused_address, run_gateway

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024


@dataclass
class StreamingUpstream:
    """A bare HTTP/1.1 server that records a PUT body as it arrives, chunk by chunk."""

    sock: socket.socket
    first_bytes: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    requests: list[tuple[str, str, int, str]] = field(default_factory=list)  # method, path, bytes, sha256

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(IO_TIMEOUT)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
            }
            length = int(headers.get("content-length", "0"))
            digest = hashlib.sha256()
            received = 0
            while True:
                if body:
                    digest.update(body)
                    received += len(body)
                    if received >= 64 * 1024:
                        self.first_bytes.set()
                if received >= length:
                    break
                body = conn.recv(65536)
                if not body:
                    break
            if path != "/nix-cache-info":  # not the gateway's health checks
                self.requests.append((method, path, received, digest.hexdigest()))
            answer = f"stored {received}\n".encode()
            status = b"201 Created" if method == "PUT" else b"200 OK"  # GETs: the health checks too
            conn.sendall(
                b"HTTP/1.1 "
                + status
                + b"\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                + f"Content-Length: {len(answer)}\r\n\r\n".encode()
                + answer
            )
            if method == "PUT":
                self.done.set()


@contextmanager
def streaming_upstream() -> Iterator[StreamingUpstream]:
    sock = socket.create_server(("127.0.0.1", 0))
    upstream = StreamingUpstream(sock)
    thread = threading.Thread(target=upstream.serve, daemon=True)
    thread.start()
    try:
        yield upstream
    finally:
        sock.close()


def announce_only(conn: http.client.HTTPSConnection, path: str, length: int) -> tuple[int, bytes]:
    """A PUT announcing ``length`` bytes and sending none: the answer to its head alone."""
    try:
        conn.putrequest("PUT", path, skip_accept_encoding=True)
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_the_default_gateway_never_exposes_push(tmp_path: Path) -> None:
    with echo_upstream() as echo, run_gateway(tmp_path, [echo.url]) as gw:
        put = gw.request("PUT", "/push/nar/" + "a" * 52 + ".nar", body=b"x" * 1000)
        get = gw.request("GET", "/push/nix-cache-info")
        narinfo = gw.request("PUT", "/push/" + "b" * 32 + ".narinfo", body=b"StorePath: /nix/store/x\n")
        sneaky = gw.request("GET", "/nar/../push/nix-cache-info")
        plain = gw.request("GET", "/nix-cache-info")
    for status, _, body in (put, get, narinfo, sneaky):
        assert status == 404
        assert body == b"404 page not found"
    assert plain[0] == 200
    assert set(echo.paths()) == {"/nix-cache-info"}  # nothing under /push reached the cache


def test_expose_push_streams_a_put_to_the_cache(tmp_path: Path) -> None:
    size = 3 * MIB  # over the general 1 MiB limit: the push route has its own
    payload = bytes(range(256)) * (size // 256)
    first, rest = payload[: 256 * 1024], payload[256 * 1024 :]
    policy = Policy(expose_push=True, max_push_body_bytes=64 * MIB)
    with streaming_upstream() as cache, run_gateway(tmp_path, [cache.url], policy) as gw:
        conn = gw.connection()
        try:
            conn.putrequest(
                "PUT", "/push/nar/" + "c" * 52 + ".nar?compression=none", skip_accept_encoding=True
            )
            conn.putheader("Content-Length", str(size))
            conn.putheader("Content-Type", "application/x-nix-nar")
            conn.endheaders()
            conn.send(first)
            # the cache holds the first bytes while the client still has the rest: streamed, not buffered
            assert cache.first_bytes.wait(IO_TIMEOUT), "the gateway buffered the upload"
            assert not cache.done.is_set()
            conn.send(rest)
            response = conn.getresponse()
            answer = response.status, response.read()
        finally:
            conn.close()
        too_large = announce_only(gw.connection(), "/push/nar/" + "d" * 52 + ".nar", 64 * MIB + 1)
        info = gw.request("GET", "/push/nix-cache-info")
    assert answer == (201, f"stored {size}\n".encode())
    method, path, received, digest = cache.requests[0]
    assert (method, path, received) == ("PUT", "/push/nar/" + "c" * 52 + ".nar?compression=none", size)
    assert digest == hashlib.sha256(payload).hexdigest()
    assert too_large[0] == 413 and too_large[1].startswith(b"413 request body too large")
    assert info[0] == 200  # GET /push/… reaches the cache too
    assert [r[1] for r in cache.requests] == [path, "/push/nix-cache-info"]  # the 413 never arrived


def test_expose_push_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["gateway", "--site", "harmonia.example.org", "--upstream", "http://127.0.0.1:5000"]
    assert caddy_cli(args) == 0
    assert "/push" not in capsys.readouterr().out
    assert caddy_cli([*args, "--expose", "push", "--max-push-body", "8GiB"]) == 0
    out = capsys.readouterr().out
    assert "@harmonia_push {" in out and "max_size 8589934592" in out
    assert caddy_cli([*args, "--expose", "push", "--max-push-body", "lots"]) == 2
    assert "--max-push-body:" in capsys.readouterr().err


def test_a_push_the_cache_does_not_answer_is_424_not_5xx(tmp_path: Path) -> None:
    # Nix <= 2.33.1 answers a 5xx to a PUT by re-sending it empty and hanging (NixOS/nix #15023)
    policy = Policy(expose_push=True, active_health_checks=False, try_duration_s=0.5)
    with refused_address() as dead, run_gateway(tmp_path, [f"http://{dead}"], policy) as gw:
        put = gw.request("PUT", "/push/nar/" + "e" * 52 + ".nar", body=b"n" * 5000)
        get = gw.request("GET", "/push/nix-cache-info")
        public = gw.request("GET", "/nix-cache-info")
    assert put[0] == 424
    assert put[2].startswith(b"424 the cache behind this frontend did not answer")
    assert get[0] in (502, 503) and public[0] in (502, 503)  # reads keep Caddy's own answer


def test_the_cache_answers_expect_100_continue_not_the_gateway(tmp_path: Path) -> None:
    # a pushing Nix sends every PUT with Expect: 100-continue; the cache refuses a bad token
    # before the body: through the gateway the client must get that refusal, not Caddy's own
    # "100 Continue" followed by an upload into the void
    heads: list[bytes] = []
    early_body: list[bytes] = []  # what arrived with a PUT's head, before the cache answered
    server = socket.create_server(("127.0.0.1", 0))

    def refuse_without_reading() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, early = data.partition(b"\r\n\r\n")
                heads.append(head)
                if head.startswith(b"PUT"):
                    early_body.append(early)
                    conn.sendall(
                        b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 13\r\nConnection: close\r\n\r\nbad token\r\n\r\n"
                    )
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    threading.Thread(target=refuse_without_reading, daemon=True).start()
    policy = Policy(expose_push=True, active_health_checks=False)
    try:
        with run_gateway(tmp_path, [f"http://127.0.0.1:{server.getsockname()[1]}"], policy) as gw:
            raw = socket.create_connection(("127.0.0.1", gw.port), timeout=IO_TIMEOUT)
            with gw.ssl_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(
                    b"PUT /push/nar/" + b"f" * 52 + b".nar HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Length: 1000000\r\nExpect: 100-continue\r\n\r\n"
                )
                first = tls.recv(65536)
    finally:
        server.close()
    assert first.startswith(b"HTTP/1.1 401"), first[:100]  # no "100 Continue" from the gateway
    (put,) = [h for h in heads if h.startswith(b"PUT")]
    assert b"expect: 100-continue" in put.lower()
    assert early_body == [b""]  # nothing of the body before the cache said go
