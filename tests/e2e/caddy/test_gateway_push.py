"""The default gateway never lets a push through: `/push/…` is no public route (issue 12)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.caddy.gateway_support import HASH, echo_upstream, run_gateway

pytestmark = pytest.mark.e2e


def test_the_default_gateway_does_not_expose_push(tmp_path: Path) -> None:
    with echo_upstream() as echo, run_gateway(tmp_path, [echo.url]) as gw:
        for method, path, body in [
            ("GET", "/push/nix-cache-info", None),
            ("GET", f"/push/{HASH}.narinfo", None),
            ("HEAD", f"/push/nar/{'0' * 52}.nar", None),
            ("PUT", f"/push/nar/{'0' * 52}.nar.zst", b"x" * 1000),
            ("PUT", f"/push/{HASH}.narinfo", b"StorePath: x\n"),
        ]:
            status, _, _ = (
                gw.request(method, path, body=body) if body is not None else gw.request(method, path)
            )
            assert status in (404, 405), (method, path, status)
        assert [p for p in echo.paths() if p.startswith("/push")] == []
        # while the binary-cache protocol itself is proxied
        assert gw.request("GET", "/nix-cache-info")[0] == 200
        assert "/nix-cache-info" in echo.paths()
