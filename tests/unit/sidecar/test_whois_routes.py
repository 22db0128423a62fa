"""The whois lookup as the real Caddy runs it, against the real sidecar's ``/whois`` on its unix
socket (the directory fed by the local tailnet's API, in-process; no node starts).

The tailnet listener is a local unix socket here (``listen_override``), so callers take the
tagged-node path and have no tailnet address: these tests show that the lookup never lets a
forged node header through, never fails or blocks a request (sidecar answering, or not there at
all) and leaves bodies alone both ways. Real names and tags reaching the upstream are checked
end to end on the local tailnet (tests/e2e/sidecar/test_whois.py).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import trio

from sidecar.control_http import request_tcp, request_unix
from sidecar.engine import CaddyEngine
from sidecar.model import ServiceSpec, SidecarSpec, validate
from sidecar.supervisor import Sidecar
from tests.tailnet import Tailnet
from tests.tailnet.fixtures import local_tailnet  # noqa: F401

from .test_authkey import session_for
from .test_routes import assert_no_node_started, running
from .upstream import Echo

FORGED = {
    "X-Tailscale-Node": "666",
    "X-Tailscale-Node-Name": "forged",
    "X-Tailscale-Node-Tags": "tag:admin",
    "X-Tailscale-Node-StableID": "nForgedCNTRL",
    "X-Tailscale-Node-Addr": "6.6.6.6",
}


def assert_nothing_forged(headers: dict[str, str]) -> None:
    assert "forged" not in str(headers).lower()
    assert "tag:admin" not in str(headers)
    assert "666" not in str(headers)
    assert "6.6.6.6" not in str(headers)
    assert "x-tailscale-node-addr" in headers  # the engine's own node identity


async def test_with_the_sidecar_answering(caddy_bin: str, tmp_path: Path, local_tailnet: Tailnet) -> None:  # noqa: F811
    size = 64 * 1024 * 1024
    (tmp_path / "api").write_text(local_tailnet.api_key + "\n")
    async with trio.open_nursery() as nursery:
        echo = Echo()
        port = await nursery.start(echo.serve)
        cfg = validate(
            SidecarSpec(
                services=[ServiceSpec(name="echo", upstream=f"http://127.0.0.1:{port}", plaintext=True)],
                state_dir=str(tmp_path / "state"),
                api_key_path=str(tmp_path / "api"),
                prometheus_addr="127.0.0.1:0",
            ),
            {},
        )
        sock = tmp_path / "echo.sock"
        engine = CaddyEngine(
            binary=caddy_bin,
            engine_dir=cfg.engine_dir,
            env={"PATH": os.environ.get("PATH", "")},
            listen_override={"echo": f"unix/{sock}"},
        )
        sidecar = Sidecar(
            cfg=cfg, engine=engine, handle_signals=False, session_factory=session_for(local_tailnet, tmp_path)
        )
        transport = httpx.AsyncHTTPTransport(uds=str(sock))
        with trio.fail_after(60):
            await nursery.start(sidecar.run)
            assert sidecar.directory is not None
            async with httpx.AsyncClient(transport=transport, base_url="http://echo", timeout=60) as client:
                forged = await client.get("/who", headers=FORGED)
                many = [await client.get(f"/n{i}") for i in range(20)]

                async def body() -> AsyncIterator[bytes]:
                    for _ in range(size // 65536):
                        yield b"y" * 65536

                put = await client.put("/upload", content=body(), headers=FORGED)
                received = 0
                async with client.stream("GET", f"/big/{size}") as big:
                    async for chunk in big.aiter_raw():
                        received += len(chunk)
            # /whois answers on the sidecar's socket, never on its TCP listener
            local = await request_unix(cfg.health_socket, "GET", "/whois?addr=100.64.0.1")
            assert sidecar.metrics_address is not None
            remote = await request_tcp(*sidecar.metrics_address, "GET", "/whois?addr=100.64.0.1")
            status = await request_unix(cfg.health_socket, "GET", "/status")
        nursery.cancel_scope.cancel()
    assert forged.status_code == 200
    assert_nothing_forged(forged.json()["headers"])
    assert [r.status_code for r in many] == [200] * 20
    assert put.status_code == 200
    assert put.json()["body_bytes"] == size  # the lookup took nothing of the body
    assert_nothing_forged(put.json()["headers"])
    assert received == size
    assert local.status == 200
    assert remote.status == 404
    directory = status.json()["whois_directory"]
    assert directory["refreshes"] >= 1
    # every request asked (no tailnet address on a unix socket: all misses); 1 is ours
    assert directory["lookups"]["miss"] >= 1 + 1 + 20 + 1 + 1
    assert_no_node_started(tmp_path)


async def test_with_the_sidecar_not_there(caddy_bin: str, tmp_path: Path) -> None:
    """The engine alone: its lookups find no socket, and every request is served anyway."""
    async with trio.open_nursery() as nursery:
        echo = Echo()
        port = await nursery.start(echo.serve)
        spec = ServiceSpec(name="echo", upstream=f"http://127.0.0.1:{port}", plaintext=True)
        cfg = validate(
            SidecarSpec(services=[spec], state_dir=str(tmp_path / "state"), api_key_path="/nonexistent"), {}
        )
        assert cfg.whois_directory
        async with running(caddy_bin, tmp_path, [spec], api_key_path="/nonexistent") as (
            running_cfg,
            _,
            clients,
        ):
            assert running_cfg.whois_directory
            assert not await trio.Path(running_cfg.health_socket).exists()
            with trio.fail_after(30):
                forged = await clients["echo"].get("/who", headers=FORGED)
                down = await clients["echo"].get("/status/503")
                posted = await clients["echo"].post("/post", content=b"z" * 100000)
        nursery.cancel_scope.cancel()
    assert forged.status_code == 200
    assert_nothing_forged(forged.json()["headers"])
    assert down.status_code == 503  # the upstream's own status, once, not a lookup error
    assert posted.status_code == 200 and posted.json()["body_bytes"] == 100000
    assert [s["path"] for s in echo.seen].count("/who") == 1  # served exactly once
