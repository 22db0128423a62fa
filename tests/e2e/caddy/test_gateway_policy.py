"""The rendered gateway, run by Debian's Caddy on loopback, in front of an echo upstream of ours.

The echo upstream records every request that reaches it, so each policy rule is checked from
both sides: what the public client gets, and what the upstream saw.
"""

from __future__ import annotations

import gzip
import json
import socket
import time
from pathlib import Path

import pytest

from caddy.policy import Policy
from tests.e2e.caddy.gateway_support import (
    HASH,
    IO_TIMEOUT,
    NAR_BODY,
    NARINFO_BODY,
    PRE_ENCODED_TEXT,
    echo_upstream,
    refused_address,
    run_gateway,
    wait_for,
)

pytestmark = pytest.mark.e2e


def _header_names(headers: list[list[str]]) -> set[str]:
    return {name.lower() for name, _ in headers}


def test_forged_identity_headers_never_reach_the_upstream(tmp_path: Path) -> None:
    with echo_upstream() as echo, run_gateway(tmp_path, [echo.url]) as gw:
        forged = {
            "X-Tailscale-User": "admin@example.com",
            "x-tailscale-user-login": "admin@example.com",
            "X-TAILSCALE-NODE-TAGS": "tag:server",
            "Tailscale-User-Login": "admin@example.com",
            "Tailscale-User-Name": "Admin",
            "Tailscale-App-Capabilities": "{}",
            "X_Tailscale_User": "admin@example.com",
            "X-Forwarded-For": "203.0.113.9",
            "X-Forwarded-Host": "evil.example",
            "X-Forwarded-Proto": "http",
            "X-Innocent": "kept",
        }
        status, _, body = gw.request("GET", "/health", headers=forged)
        assert status == 200
        seen = json.loads(body)
        names = _header_names(seen["headers"])
        leaked = {n for n in names if "tailscale" in n}
        assert not leaked, f"identity headers reached the upstream: {leaked}"
        got = {name.lower(): value for name, value in seen["headers"]}
        assert got["x-innocent"] == "kept"
        # X-Forwarded-* are Caddy's own, not the client's
        assert got["x-forwarded-for"] == "127.0.0.1"
        assert got["x-forwarded-proto"] == "https"
        assert got["x-forwarded-host"] == f"127.0.0.1:{gw.port}"
        # the upstream is addressed by its own name
        assert got["host"] == f"127.0.0.1:{echo.port}"


@pytest.mark.parametrize(
    "path",
    [
        "/serve/" + HASH + "/bin/secret",
        "/log/" + HASH + "-x.drv",
        "/metrics",
        "/",
        "/version",
        "/serve/../nar/abc.nar",
        "/nar/../serve/" + HASH,
        "/nar/..%2Fserve%2F" + HASH,
        "//serve/" + HASH,
        "/%73erve/" + HASH,
        "/" + HASH + ".narinfo/../../serve/x",
        "/nix-cache-info/",
    ],
)
def test_only_the_binary_cache_protocol_is_public(tmp_path: Path, path: str) -> None:
    with echo_upstream() as echo, run_gateway(tmp_path, [echo.url]) as gw:
        status, _, _ = gw.request("GET", path)
        assert status == 404
        assert all(
            not p.startswith(("/serve", "/log", "/metrics", "/version", "/nar/..", "//"))
            for p in echo.paths()
        ), echo.paths()
        assert path not in echo.paths()


def test_public_routes_reach_the_cache_and_other_methods_are_refused(tmp_path: Path) -> None:
    public = [
        "/nix-cache-info",
        f"/{HASH}.narinfo",
        f"/{HASH}.narinfo?json",
        "/nar/1w5m3x7k.nar?hash=" + HASH,
        "/nar/1w5m3x7k.nar.zst",
        f"/{HASH}.ls",
        f"/nar/{HASH}-1w5m3x7k.nar",
        "/health",
    ]
    with echo_upstream() as echo, run_gateway(tmp_path, [echo.url]) as gw:
        for path in public:
            status, _, _ = gw.request("GET", path)
            assert status == 200, path
            assert path in echo.paths()
            head_status, _, head_body = gw.request("HEAD", path)
            assert (head_status, head_body) == (200, b"")
        before = len(echo.seen)
        status, headers, _ = gw.request("PUT", f"/nar/{HASH}.nar", body=b"x" * 100)
        assert status == 405
        assert headers["allow"] == "GET, HEAD"
        status, _, _ = gw.request("POST", "/nix-cache-info", body=b"")
        assert status == 405
        assert [s for s in echo.seen[before:] if s.method in ("PUT", "POST")] == []
        # access logs: one JSON line per request
        lines = wait_for(lambda: gw.access_log.exists() and gw.access_log.read_text().splitlines(), timeout=5)
        logged = [json.loads(line)["request"]["uri"] for line in lines]
        assert "/nix-cache-info" in logged
        assert f"/nar/{HASH}.nar" in logged


def test_small_text_is_compressed_but_nars_and_encoded_responses_pass_untouched(
    tmp_path: Path,
) -> None:
    accept = {"Accept-Encoding": "gzip"}
    with echo_upstream() as echo, run_gateway(tmp_path, [echo.url]) as gw:
        status, headers, body = gw.request("GET", f"/{HASH}.narinfo", headers=accept)
        assert status == 200
        assert headers.get("content-encoding") == "gzip"
        assert gzip.decompress(body) == NARINFO_BODY

        status, headers, body = gw.request("GET", "/nar/1w5m3x7k.nar", headers=accept)
        assert status == 200
        assert "content-encoding" not in headers
        assert body == NAR_BODY

        # an upstream's own Content-Encoding is passed through, not encoded twice
        status, headers, body = gw.request(
            "GET", f"/{'e' * 32}.narinfo", headers={"Accept-Encoding": "gzip, zstd"}
        )
        assert status == 200
        assert headers.get("content-encoding") == "gzip"
        assert gzip.decompress(body) == PRE_ENCODED_TEXT

        # the client's Accept-Encoding reaches the cache as sent (transport compression off)
        status, _, body = gw.request("GET", "/health", headers={"Accept-Encoding": "zstd"})
        got = {n.lower(): v for n, v in json.loads(body)["headers"]}
        assert got.get("accept-encoding") == "zstd"
        # and without one, Caddy's transport adds none (Nix 2.8 sends none)
        status, _, body = gw.request("GET", "/health")
        assert "accept-encoding" not in _header_names(json.loads(body)["headers"])


def test_responses_are_streamed_not_buffered(tmp_path: Path) -> None:
    with echo_upstream() as echo, run_gateway(tmp_path, [echo.url]) as gw:
        conn = gw.connection()
        try:
            conn.request("GET", "/nar/slow.nar")
            response = conn.getresponse()
            assert response.status == 200
            # the upstream sent 1000 bytes and now waits: they must arrive before it goes on
            first = response.read(1000)
            assert first == NAR_BODY[:1000]
            assert not echo.release_slow.is_set()
            echo.release_slow.set()
            assert first + response.read() == NAR_BODY
        finally:
            conn.close()


def test_fails_over_to_the_next_upstream(tmp_path: Path) -> None:
    with (
        refused_address() as dead,
        echo_upstream() as echo,
        run_gateway(tmp_path, [f"http://{dead}", echo.url]) as gw,
    ):
        start = time.monotonic()
        for _ in range(3):
            status, _, body = gw.request("GET", "/nar/1w5m3x7k.nar")
            assert status == 200
            assert body == NAR_BODY
        assert time.monotonic() - start < 10


def test_fails_over_across_transports(tmp_path: Path) -> None:
    """https first (the sidecar's ts.net name in the fleet), then plain http: two groups."""
    with (
        refused_address() as dead,
        echo_upstream() as echo,
        run_gateway(tmp_path, [f"https://{dead}", echo.url]) as gw,
    ):
        assert "handle_errors" in gw.caddyfile
        for path in ("/nix-cache-info", "/nar/1w5m3x7k.nar", f"/{HASH}.narinfo"):
            start = time.monotonic()
            status, _, body = gw.request("GET", path)
            assert status == 200, (path, body)
            # at once: the first group is tried once, not for the whole retry window
            assert time.monotonic() - start < Policy().try_duration_s, path
        assert "/nar/1w5m3x7k.nar" in echo.paths()
        # reads only: an upload is not replayed on the second group
        status, _, _ = gw.request("GET", "/serve/x")
        assert status == 404


def test_answers_promptly_while_the_upstream_is_down_and_recovers(tmp_path: Path) -> None:
    with echo_upstream() as first:
        port = first.port
        with run_gateway(tmp_path, [first.url]) as gw:
            assert gw.request("GET", "/nix-cache-info")[0] == 200
            first.stop()
            start = time.monotonic()
            status, _, _ = gw.request("GET", "/nix-cache-info")
            elapsed = time.monotonic() - start
            assert status in (502, 503)
            assert elapsed < Policy().try_duration_s + Policy().dial_timeout_s + 2
            # back on the same port: the gateway notices without a restart
            with echo_upstream(port) as again:
                status = wait_for(
                    lambda: gw.request("GET", "/nix-cache-info")[0] == 200,
                    timeout=Policy().fail_duration_s + 3 * Policy().health_interval_s,
                )
                assert status, "the gateway did not recover after the upstream came back"
                assert "/nix-cache-info" in again.paths()


def test_request_body_limit(tmp_path: Path) -> None:
    policy = Policy(allow_upload=True, max_request_body_bytes=1024)
    with echo_upstream() as echo, run_gateway(tmp_path, [echo.url], policy) as gw:
        status, _, _ = gw.request("PUT", f"/nar/{HASH}.nar", body=b"x" * 512)
        assert status == 201
        status, _, _ = gw.request("PUT", f"/nar/{'1' * 32}.nar", body=b"x" * 4096)
        assert status == 413
        assert not any(s.path == f"/nar/{'1' * 32}.nar" and s.body_size == 4096 for s in echo.seen)


def test_a_dial_that_hangs_does_not_hang_the_client(tmp_path: Path) -> None:
    """A listening socket that never accepts: the short dial timeout (not a response deadline)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    # fill the accept queue so further SYNs are not answered
    fillers = []
    try:
        for _ in range(8):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex(listener.getsockname())
            fillers.append(s)
        hung = f"127.0.0.1:{listener.getsockname()[1]}"
        # a long health-check timeout keeps the active check from marking it down first
        policy = Policy(health_timeout_s=60)
        with echo_upstream() as echo, run_gateway(tmp_path, [f"http://{hung}", echo.url], policy) as gw:
            start = time.monotonic()
            status, _, _ = gw.request("GET", "/nix-cache-info", timeout=IO_TIMEOUT)
            elapsed = time.monotonic() - start
            assert status == 200
            assert "/nix-cache-info" in echo.paths()
            # the dial to the first upstream hung until the dial timeout, then the next answered
            assert policy.dial_timeout_s - 0.5 <= elapsed < policy.try_duration_s + 2, elapsed
    finally:
        for s in fillers:
            s.close()
        listener.close()
