"""The compiled routes, run by the real Caddy against a real upstream, on local unix sockets.

The tailnet listener is swapped for a unix socket (``listen_override``), so no Tailscale node
starts; everything else is the config the sidecar loads. Without a tsnet listener the tailscale
auth provider cannot identify anyone and answers 401 — exactly the path a tagged node takes — so
these tests cover the 401 re-serve route, header stripping, prefixes, streaming and errors.
The identity of untagged users is checked end to end on the local tailnet (tests/e2e/sidecar).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import httpx
import trio

from sidecar.engine import CaddyEngine
from sidecar.model import ServiceSpec, SidecarSpec, ValidConfig, validate

from .upstream import Echo

FORGED = {
    "X-Tailscale-User": "forged",
    "X-Tailscale-User-LoginName": "root@forged",
    "x-tailscale-node-name": "forged",
    "X-Tailscale-Node-Addr": "6.6.6.6",
    "Tailscale-User-Login": "forged",
    "Tailscale-User-Name": "forged",
}


@asynccontextmanager
async def running(
    caddy_bin: str, tmp: Path, services: list[ServiceSpec], api_key_path: str | None = None
) -> AsyncIterator[tuple[ValidConfig, CaddyEngine, dict[str, httpx.AsyncClient]]]:
    cfg = validate(
        SidecarSpec(services=services, state_dir=str(tmp / "state"), api_key_path=api_key_path), {}
    )
    sockets = {s.name: str(tmp / f"{s.name}.sock") for s in cfg.services}
    engine = CaddyEngine(
        binary=caddy_bin,
        engine_dir=cfg.engine_dir,
        env={"PATH": os.environ.get("PATH", "")},
        listen_override={k: f"unix/{v}" for k, v in sockets.items()},
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            await nursery.start(_engine_task, engine)
            await engine.apply(cfg, {s.name: None for s in cfg.services})
        clients = {
            name: httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=path), base_url=f"http://{name}", timeout=60
            )
            for name, path in sockets.items()
        }
        try:
            yield cfg, engine, clients
        finally:
            for c in clients.values():
                await c.aclose()
            nursery.cancel_scope.cancel()
    assert_no_node_started(tmp)


def assert_no_node_started(tmp: Path) -> None:
    assert not list(tmp.glob("**/tailscaled.state")), "a Tailscale node started outside a netns"


async def _engine_task(engine: CaddyEngine, task_status: trio.TaskStatus[None]) -> None:
    try:
        await engine.start(task_status=task_status)
    finally:
        await engine.stop()


async def test_forged_identity_never_reaches_the_upstream(caddy_bin: str, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        echo = Echo()
        port = await nursery.start(echo.serve)
        spec = ServiceSpec(
            name="echo", upstream=f"http://127.0.0.1:{port}", plaintext=True, upstream_headers=["X-Extra: 1"]
        )
        async with running(caddy_bin, tmp_path, [spec]) as (_, _, clients):
            with trio.fail_after(30):
                r = await clients["echo"].get("/who?x=1", headers=FORGED)
        nursery.cancel_scope.cancel()
    assert r.status_code == 200  # served although whois failed (the tagged-node path)
    seen = r.json()
    headers = seen["headers"]
    assert seen["path"] == "/who?x=1"
    assert "forged" not in str(headers)
    assert "6.6.6.6" not in str(headers)
    assert not [h for h in headers if h.startswith("tailscale-user")]
    assert not [h for h in headers if h.startswith("x-tailscale-user")]
    assert "x-tailscale-node-addr" in headers  # node identity: the caller's tailnet address
    assert headers["x-extra"] == "1"
    assert headers["x-scheme"] == "http"


async def test_suppress_whois_still_strips(caddy_bin: str, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        echo = Echo()
        port = await nursery.start(echo.serve)
        spec = ServiceSpec(
            name="echo", upstream=f"http://127.0.0.1:{port}", plaintext=True, suppress_whois=True
        )
        async with running(caddy_bin, tmp_path, [spec]) as (_, _, clients):
            with trio.fail_after(30):
                r = await clients["echo"].get("/", headers=FORGED)
        nursery.cancel_scope.cancel()
    assert r.status_code == 200
    assert not [h for h in r.json()["headers"] if "tailscale" in h]


async def test_prefixes_filter_and_strip(caddy_bin: str, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        echo = Echo()
        port = await nursery.start(echo.serve)
        services = [
            ServiceSpec(
                name="strip",
                upstream=f"http://127.0.0.1:{port}",
                plaintext=True,
                prefixes=["/cache", "tailnet:/v1.0", "funnel:/public"],
            ),
            ServiceSpec(
                name="keep",
                upstream=f"http://127.0.0.1:{port}/base",
                plaintext=True,
                prefixes=["/cache"],
                strip_prefix=False,
            ),
        ]
        async with running(caddy_bin, tmp_path, services) as (_, _, clients):
            with trio.fail_after(30):
                strip, keep = clients["strip"], clients["keep"]
                stripped = await strip.get("/cache/nix-cache-info")
                dotted = await strip.get("/v1.0/x")
                not_dot = await strip.get("/v1x0/x")  # '.' is literal, not a regex wildcard
                funnel_only = await strip.get("/public/x")
                outside = await strip.get("/secret")
                sneaky = await strip.get("/cache/../secret")
                kept = await keep.get("/cache/a")
        nursery.cancel_scope.cancel()
    assert stripped.status_code == 200
    assert stripped.json()["path"] == "/nix-cache-info"
    assert dotted.json()["path"] == "/x"
    for r in (not_dot, funnel_only, outside, sneaky):
        assert r.status_code == 404
        assert r.text == "404 page not found\n"
    assert kept.json()["path"] == "/base/cache/a"
    assert {s["path"] for s in echo.seen} == {"/nix-cache-info", "/x", "/base/cache/a"}


async def test_large_bodies_stream_both_ways(caddy_bin: str, tmp_path: Path) -> None:
    size = 64 * 1024 * 1024
    async with trio.open_nursery() as nursery:
        echo = Echo()
        port = await nursery.start(echo.serve)
        spec = ServiceSpec(name="echo", upstream=f"http://127.0.0.1:{port}", plaintext=True)
        async with running(caddy_bin, tmp_path, [spec]) as (_, _, clients):
            with trio.fail_after(60):
                received = 0
                first_byte_at = None
                started = trio.current_time()
                async with clients["echo"].stream("GET", f"/big/{size}") as r:
                    assert r.status_code == 200
                    async for chunk in r.aiter_raw():
                        if first_byte_at is None:
                            first_byte_at = trio.current_time() - started
                        received += len(chunk)

                async def body() -> AsyncIterator[bytes]:
                    for _ in range(size // 65536):
                        yield b"y" * 65536

                put = await clients["echo"].put("/upload", content=body())
        nursery.cancel_scope.cancel()
    assert received == size
    assert first_byte_at is not None
    assert first_byte_at < 5
    assert put.status_code == 200
    assert put.json()["body_bytes"] == size


async def test_upstream_errors_and_statuses_pass_through(caddy_bin: str, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        echo = Echo()
        port = await nursery.start(echo.serve)
        with trio.socket.socket() as probe:  # a port with nobody listening
            await probe.bind(("127.0.0.1", 0))
            dead = probe.getsockname()[1]
        services = [
            ServiceSpec(name="echo", upstream=f"http://127.0.0.1:{port}", plaintext=True),
            ServiceSpec(
                name="dead",
                upstream=f"http://127.0.0.1:{dead}",
                plaintext=True,
                policy={"try_duration_s": 0.5},
            ),
        ]
        async with running(caddy_bin, tmp_path, services) as (_, _, clients):
            with trio.fail_after(30):
                not_found = await clients["echo"].get("/status/404")
                unavailable = await clients["echo"].get("/status/503")
                # no health checks on a single upstream: its 503 does not mark it down
                after = await clients["echo"].get("/after")
                down = await clients["dead"].get("/")
        nursery.cancel_scope.cancel()
    assert not_found.status_code == 404
    assert unavailable.status_code == 503
    assert after.status_code == 200
    assert down.status_code == 502  # not the 401 of the tagged-node path it went through
    assert down.text == "502 Bad Gateway\n"


async def test_a_content_length_over_the_body_limit_is_413_before_proxying(
    caddy_bin: str, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        echo = Echo()
        port = await nursery.start(echo.serve)
        services = [
            ServiceSpec(
                name="small",
                upstream=f"http://127.0.0.1:{port}",
                plaintext=True,
                policy={"max_request_body_bytes": 1000},
            ),
            ServiceSpec(
                name="prefixed",
                upstream=f"http://127.0.0.1:{port}",
                plaintext=True,
                prefixes=["/p"],
                policy={"max_request_body_bytes": 1000},
            ),
        ]
        async with running(caddy_bin, tmp_path, services) as (_, _, clients):
            with trio.fail_after(30):
                too_big = await clients["small"].put("/too-big", content=b"z" * 1001)
                fits = await clients["small"].put("/fits", content=b"z" * 1000)
                prefixed_too_big = await clients["prefixed"].put("/p/too-big", content=b"z" * 5000)
                prefixed_fits = await clients["prefixed"].put("/p/fits", content=b"z" * 10)
        nursery.cancel_scope.cancel()
    assert too_big.status_code == 413
    assert too_big.text == "413 request body too large"
    assert prefixed_too_big.status_code == 413
    assert fits.status_code == 200
    assert fits.json()["body_bytes"] == 1000
    assert prefixed_fits.status_code == 200
    assert prefixed_fits.json()["path"] == "/fits"
    assert [s["path"] for s in echo.seen] == ["/fits", "/fits"]  # the 413s never reached it


async def test_push_allow_guards_push_and_only_push(caddy_bin: str, tmp_path: Path) -> None:
    # a caller the engine cannot name (here: a unix socket, like a tagged node without the
    # directory) is refused /push with 403 before its body is read, even forging the allowed
    # login; everything else, and /push on a service without push_allow, is served as before
    async with trio.open_nursery() as nursery:
        echo = Echo()
        port = await nursery.start(echo.serve)
        services = [
            ServiceSpec(
                name="guarded",
                upstream=f"http://127.0.0.1:{port}",
                plaintext=True,
                push_allow=["ci@example.com"],
            ),
            ServiceSpec(name="open", upstream=f"http://127.0.0.1:{port}", plaintext=True),
        ]
        async with running(caddy_bin, tmp_path, services) as (_, _, clients):
            with trio.fail_after(30):
                forged = {
                    "X-Tailscale-User-LoginName": "ci@example.com",
                    "Tailscale-User-Login": "ci@example.com",
                }
                refused = await clients["guarded"].put("/push/nar/x.nar", content=b"n" * 5000, headers=forged)
                refused_get = await clients["guarded"].get("/push/nix-cache-info")
                sneaky = await clients["guarded"].get("/x/../push/nix-cache-info")
                served = await clients["guarded"].get("/nix-cache-info")
                pushed = await clients["open"].put("/push/nar/y.nar", content=b"n" * 5000)
        nursery.cancel_scope.cancel()
    assert refused.status_code == refused_get.status_code == 403
    assert refused.text == "403 this caller may not push here\n"
    assert sneaky.status_code == 403  # the path as sent is checked too
    assert served.status_code == 200
    assert pushed.status_code == 200
    assert [(s["method"], s["path"], s["body_bytes"]) for s in echo.seen] == [
        ("GET", "/nix-cache-info", 0),
        ("PUT", "/push/nar/y.nar", 5000),
    ]


async def test_a_push_the_upstream_does_not_answer_is_424_not_5xx(caddy_bin: str, tmp_path: Path) -> None:
    # Nix <= 2.33.1 answers a 5xx to a PUT by re-sending it with an empty body and hanging
    # (NixOS/nix #15023): a push the node cannot deliver is 424; anything else keeps its 502
    with trio.socket.socket() as probe:  # a port with nobody listening
        await probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    services = [
        ServiceSpec(
            name="dead", upstream=f"http://127.0.0.1:{dead}", plaintext=True, policy={"try_duration_s": 0.5}
        ),
        ServiceSpec(
            name="guarded",
            upstream=f"http://127.0.0.1:{dead}",
            plaintext=True,
            policy={"try_duration_s": 0.5},
            push_allow=["ci@example.com"],
        ),
    ]
    async with running(caddy_bin, tmp_path, services) as (_, _, clients):
        with trio.fail_after(30):
            push = await clients["dead"].put("/push/nar/x.nar", content=b"n" * 5000)
            push_get = await clients["dead"].get("/push/nix-cache-info")
            other_put = await clients["dead"].put("/elsewhere", content=b"n")
            refused = await clients["guarded"].put("/push/nar/x.nar", content=b"n" * 5000)
    assert push.status_code == 424
    assert push.text.startswith("424 the cache behind this frontend did not answer")
    assert push_get.status_code == other_put.status_code == 502
    assert refused.status_code == 403  # the guard answers before any proxying


async def test_the_upstream_answers_expect_100_continue(caddy_bin: str, tmp_path: Path) -> None:
    # a pushing Nix sends Expect: 100-continue; the cache's refusal must reach it before it
    # uploads, not the engine's own "100 Continue"
    heads: list[bytes] = []

    async def refuse(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            data += chunk
        heads.append(data.partition(b"\r\n\r\n")[0])
        await stream.send_all(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\nConnection: close\r\n\r\nno\r\n"
        )
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, refuse, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        spec = ServiceSpec(name="cache", upstream=f"http://127.0.0.1:{port}", plaintext=True)
        async with running(caddy_bin, tmp_path, [spec]) as (_, _, _clients):
            with trio.fail_after(30):
                stream = await trio.open_unix_socket(str(tmp_path / "cache.sock"))
                async with stream:
                    await stream.send_all(
                        b"PUT /push/nar/x.nar HTTP/1.1\r\nHost: cache\r\nContent-Length: 1000000\r\n"
                        b"Expect: 100-continue\r\n\r\n"
                    )
                    first = await stream.receive_some(65536)
        nursery.cancel_scope.cancel()
    assert first.startswith(b"HTTP/1.1 401"), first[:80]
    (head,) = heads
    assert b"expect: 100-continue" in head.lower()
