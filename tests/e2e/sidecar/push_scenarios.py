"""Push through the sidecar's tailnet node, run inside a test network namespace.

The cache (push enabled, importing through the test's own untrusting nix-daemon, whose unix socket
the namespace shares) is published as node ``harmonia`` by the sidecar; a builder node pushes with
``nix copy --to http://harmonia/push`` through its proxy, netrc token and signing key as the fleet
does (docs/push.md). Returns what it saw; the test outside checks the host store.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from tests.e2e.sidecar.scenarios import Sidecar, all_running
from tests.support.processes import stop_process
from tests.tailnet import Tailnet, TailnetConfig, serve_tailnet
from tests.tailnet.nodes import NODE_ENV, http_get_retrying, mesh_node


async def push_through_sidecar(
    workdir: str,
    host: str,
    store: str,
    paths: list[str],
    pusher_secret: str,
    pusher_public: str,
    daemon_socket: str,
) -> dict[str, Any]:
    from tests.support.cache_server import start_cache
    from tests.support.nix import nix_env

    work = Path(workdir)
    seen: dict[str, Any] = {}
    push = {"enable": True, "trusted_keys": [pusher_public]}
    cache_cm = start_cache(work / "cache", daemon_socket=daemon_socket, push=push, enable_compression=False)
    cache = await trio.to_thread.run_sync(cache_cm.__enter__)
    try:
        made = await trio.run_process(
            [
                sys.executable,
                "-m",
                "cache",
                "--config",
                str(cache.config_file),
                "push-token",
                "create",
                "builder",
            ],
            capture_stdout=True,
            capture_stderr=True,
        )
        token = made.stdout.decode().strip()
        async with trio.open_nursery() as nursery:
            tailnet: Tailnet = await nursery.start(serve_tailnet, TailnetConfig(host=host))
            (work / "authkey").write_text(tailnet.auth_key.key + "\n")
            env = {**os.environ, **NODE_ENV, "TS_URL": tailnet.control_url}
            env.pop("TS_AUTHKEY", None)
            log_path = work / "sidecar.log"
            argv = [
                sys.executable, "-m", "sidecar", "--name", "harmonia", "--plaintext",
                "--state-root", str(work / "state"), "--authkey-path", str(work / "authkey"), cache.url,
            ]  # fmt: skip
            with log_path.open("ab") as out:
                proc = await trio.lowlevel.open_process(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
            side = Sidecar(proc, str(work / "state" / "sidecar.sock"), log_path)
            try:
                with trio.fail_after(60):
                    await side.wait(all_running({"harmonia"}))
                async with mesh_node(
                    work / "builder",
                    "builder",
                    control_url=tailnet.control_url,
                    auth_key=tailnet.auth_key.key,
                ) as client:
                    with trio.fail_after(60):
                        await http_get_retrying("http://harmonia/nix-cache-info", proxy=client.proxy_url)

                    async def copy(password: str, tag: str) -> dict[str, Any]:
                        netrc = work / f"netrc-{tag}"
                        netrc.write_text(f"machine harmonia login builder password {password}\n")
                        client_env = nix_env(
                            work / f"xdg-{tag}",
                            extra_config=f"netrc-file = {netrc}\nconnect-timeout = 10\n",
                            http_proxy=client.proxy_url,
                            HTTP_PROXY=client.proxy_url,
                        )
                        url = f"http://harmonia/push?compression=zstd&secret-key={pusher_secret}"
                        t0 = time.monotonic()
                        with trio.fail_after(200):
                            done = await trio.run_process(
                                ["nix", "copy", "--from", store, "--to", url, *paths],
                                env=client_env,
                                capture_stdout=True,
                                capture_stderr=True,
                                check=False,
                            )
                        return {
                            "returncode": done.returncode,
                            "stderr": done.stderr.decode(errors="replace")[-3000:],
                            "seconds": round(time.monotonic() - t0, 2),
                        }

                    seen["wrong_token"] = await copy("hcp_not-a-token", "wrong")
                    seen["push"] = await copy(token, "right")
            finally:
                await stop_process(proc)
            nursery.cancel_scope.cancel()
        seen["token_logged"] = token in cache.log or token in log_path.read_text(errors="replace")
    finally:
        await trio.to_thread.run_sync(cache_cm.__exit__, None, None, None)
    return seen
