"""`max_connection_rate` means what it means in harmonia (actix-web): TLS handshakes in progress at
once per worker, not new connections a second. Plain connections are never throttled by it."""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from pathlib import Path

import pytest
import trustme

from tests.support.cache_server import start_cache

from .support import Figures, hostport

pytestmark = pytest.mark.e2e


def test_max_connection_rate_bounds_tls_handshakes_in_progress(
    tmp_path: Path, nix_daemon_env: dict[str, str], figures: Figures
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "chain.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ctx = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    with start_cache(
        tmp_path,
        tls_cert_path=str(tmp_path / "chain.pem"),
        tls_key_path=str(tmp_path / "key.pem"),
        max_connection_rate=2,
    ) as cache:
        host, port = hostport(cache)

        def handshake(timeout: float) -> bool:
            raw = socket.create_connection((host, port), timeout=timeout)
            try:
                with ctx.wrap_socket(raw, server_hostname=host) as tls:
                    tls.sendall(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    return tls.recv(4096).startswith(b"HTTP/1.1 200")
            except (TimeoutError, ssl.SSLError, OSError):
                return False
            finally:
                raw.close()

        assert handshake(10)
        # two clients that connect and never say hello hold both handshake slots
        silent = [socket.create_connection((host, port), timeout=10) for _ in range(2)]
        try:
            time.sleep(0.3)
            blocked = not handshake(1.5)
        finally:
            for s in silent:
                s.close()
        started = time.monotonic()
        after = handshake(10)
        figures.record(
            max_connection_rate=2,
            third_handshake_blocked_while_two_in_progress=blocked,
            handshake_after_slots_freed_s=round(time.monotonic() - started, 3),
        )
        assert blocked, "a third handshake went ahead while two were in progress"
        assert after, "the handshake did not proceed once the slots were free"


def test_max_connection_rate_does_not_throttle_plain_connections(
    tmp_path: Path, nix_daemon_env: dict[str, str], figures: Figures
) -> None:
    connections = 50
    with start_cache(tmp_path, max_connection_rate=1) as cache:
        host, port = hostport(cache)
        answered = 0
        started = time.monotonic()
        while answered < connections and time.monotonic() - started < 5:  # as a rate: 50 s
            conn = http.client.HTTPConnection(host, port, timeout=5)
            try:
                conn.request("GET", "/nix-cache-info")
                resp = conn.getresponse()
                resp.read()
                answered += resp.status == 200
            finally:
                conn.close()
        elapsed = time.monotonic() - started
        figures.record(
            max_connection_rate=1, new_connections=connections, answered=answered, seconds=round(elapsed, 3)
        )
        assert answered == connections, f"{answered} of {connections} new connections in {elapsed:.1f}s"
