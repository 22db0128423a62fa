"""Several sidecar processes on one host (issue 15), run inside a test network namespace.

Two ``harmonia-sidecar`` processes started by hand the README's way, one per service, each with
its own ``--state-dir`` and no ``TS_STATE_DIR``: they share the default state root (under
``$HOME``), and must not share an engine or a control socket. Also: a second process on the very
same state root is refused; one restarted leaves the other serving; how long SIGTERM takes with
one node and with several.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from tests.e2e.sidecar.scenarios import Sidecar, all_running, service_toml
from tests.tailnet import Tailnet, TailnetConfig, serve_tailnet
from tests.tailnet.nodes import NODE_ENV, http_get_retrying, mesh_node
from tests.unit.sidecar.upstream import Echo

STATE_ENV = ("TS_STATE_DIR", "STATE_DIRECTORY", "XDG_STATE_HOME", "TS_AUTHKEY")


def _env(tailnet: Tailnet, home: Path) -> dict[str, str]:
    env = {**os.environ, **NODE_ENV, "TS_URL": tailnet.control_url, "HOME": str(home)}
    for name in STATE_ENV:
        env.pop(name, None)
    return env


@asynccontextmanager
async def hand_started(
    args: list[str], env: dict[str, str], log_path: Path, control_socket: Path
) -> AsyncIterator[Sidecar]:
    with log_path.open("ab") as out:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "sidecar", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        yield Sidecar(proc, str(control_socket), log_path)
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.terminate()
                with trio.move_on_after(20):
                    await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


async def stop_timed(side: Sidecar) -> tuple[int, float, bool]:
    """SIGTERM; the exit code, the seconds until the process has exited, and whether its engine
    (Caddy) was gone by then."""
    engine = (await side.status())["engine_pid"]
    t0 = time.monotonic()
    side.proc.send_signal(signal.SIGTERM)
    with trio.fail_after(40):
        code = await side.proc.wait()
    return code, round(time.monotonic() - t0, 2), not _alive(engine)


async def hold_a_download(proxy: str, url: str) -> trio.SocketStream:
    """A GET through the client's proxy whose body is started and then left unread."""
    parts = urlsplit(proxy)
    stream = await trio.open_tcp_stream(parts.hostname or "", parts.port or 80)
    host = urlsplit(url).netloc
    await stream.send_all(f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    head = b""
    while b"200" not in head:
        head += await stream.receive_some(65536)
    return stream


async def serves(url: str, proxy: str, echo: Echo) -> bool:
    before = len(echo.seen)
    with trio.move_on_after(20):
        answer = await http_get_retrying(url, proxy=proxy)
        return answer.status == 200 and len(echo.seen) > before and json.loads(answer.body)["path"] != ""
    return False


async def several_on_one_host(workdir: str, host: str) -> dict[str, Any]:
    work = Path(workdir)
    # a short $HOME: the default root's sockets must fit in a unix socket path
    home = Path(tempfile.mkdtemp(prefix="hs-", dir="/tmp"))
    root = home / ".local" / "state" / "harmonia-sidecar"
    seen: dict[str, Any] = {"root": str(root)}
    try:
        async with trio.open_nursery() as nursery:
            tailnet: Tailnet = await nursery.start(serve_tailnet, TailnetConfig(host=host))
            cache, echo = Echo(), Echo()
            cache_port = await nursery.start(cache.serve)
            echo_port = await nursery.start(echo.serve)
            (work / "authkey").write_text(tailnet.auth_key.key + "\n")
            env = _env(tailnet, home)
            common = ["--plaintext", "--authkey-path", str(work / "authkey")]
            harmonia_args = [
                "--name", "harmonia", "--state-dir", str(work / "harmonia"), *common,
                f"http://127.0.0.1:{cache_port}",
            ]  # fmt: skip
            echo_args = [
                "--name", "echo", "--state-dir", str(work / "echo"), *common, f"http://127.0.0.1:{echo_port}"
            ]  # fmt: skip
            harmonia_sock, echo_sock = root / "_harmonia" / "sidecar.sock", root / "_echo" / "sidecar.sock"
            async with (
                hand_started(harmonia_args, env, work / "harmonia.log", harmonia_sock) as first,
                hand_started(echo_args, env, work / "echo.log", echo_sock) as second,
            ):
                try:
                    with trio.fail_after(90):
                        await first.wait(all_running({"harmonia"}))
                        await second.wait(all_running({"echo"}))
                except trio.TooSlowError:
                    seen["logs"] = [first.log_tail(), second.log_tail()]
                    raise
                seen["engine_dirs"] = sorted(p.name for p in root.iterdir() if p.is_dir())
                seen["engine_pids"] = [(await s.status())["engine_pid"] for s in (first, second)]
                status = await trio.run_process(
                    [sys.executable, "-m", "sidecar", "status"],
                    env=env,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                seen["status_printed"] = [status.returncode, status.stdout.decode()]
                async with mesh_node(
                    work / "laptop", "laptop", control_url=tailnet.control_url, auth_key=tailnet.auth_key.key
                ) as laptop:
                    proxy = laptop.proxy_url
                    # both at the same time: requests interleaved over one client
                    seen["both_serve"] = []
                    for i in range(3):
                        seen["both_serve"].append(
                            [
                                await serves(f"http://harmonia/c{i}", proxy, cache),
                                await serves(f"http://echo/e{i}", proxy, echo),
                            ]
                        )

                    # a third process on the same default root with a name already running there
                    # (its own node directory, so only the engine would collide): refused
                    with trio.fail_after(30):
                        clash = await trio.run_process(
                            [
                                sys.executable, "-m", "sidecar", "--name", "echo",
                                "--state-dir", str(work / "echo-2"), *common, f"http://127.0.0.1:{echo_port}",
                            ],
                            env=env, capture_stdout=True, capture_stderr=True, check=False,
                        )  # fmt: skip
                    seen["clash"] = [clash.returncode, clash.stderr.decode(errors="replace")]
                    seen["echo_after_clash"] = await serves("http://echo/after-clash", proxy, echo)

                    # restart one while the other runs: the other keeps serving throughout
                    seen["stop_one_node"] = list(await stop_timed(first))
                    seen["echo_while_harmonia_down"] = await serves("http://echo/while-down", proxy, echo)
                    async with hand_started(
                        harmonia_args, env, work / "harmonia-2.log", harmonia_sock
                    ) as again:
                        with trio.fail_after(90):
                            await again.wait(all_running({"harmonia"}))
                        seen["after_restart"] = [
                            await serves("http://harmonia/back", proxy, cache),
                            await serves("http://echo/still", proxy, echo),
                        ]
                        # SIGTERM while a download is in flight (Caddy waits for active requests)
                        with trio.fail_after(30):
                            held = await hold_a_download(proxy, "http://harmonia/big/100000000000")
                        async with held:
                            seen["stop_one_node_in_flight"] = list(await stop_timed(again))
                        seen["second_engine_pid_unchanged"] = (await second.status())["engine_pid"] == seen[
                            "engine_pids"
                        ][1]

            # the very same state root (given with --state-root) twice: the second is refused
            shared = work / "shared"
            one_args = [
                "--name",
                "one",
                "--state-root",
                str(shared),
                *common,
                f"http://127.0.0.1:{echo_port}",
            ]
            async with hand_started(one_args, env, work / "one.log", shared / "sidecar.sock") as one:
                with trio.fail_after(90):
                    await one.wait(all_running({"one"}))
                with trio.fail_after(30):
                    refused = await trio.run_process(
                        [
                            sys.executable, "-m", "sidecar", "--name", "two", "--state-root", str(shared),
                            *common, f"http://127.0.0.1:{echo_port}",
                        ],
                        env=env, capture_stdout=True, capture_stderr=True, check=False,
                    )  # fmt: skip
                seen["same_root"] = [refused.returncode, refused.stderr.decode(errors="replace")]
                seen["one_still_running"] = all_running({"one"})(await one.status())

            # SIGTERM with several nodes in one process (--config)
            names = ["n1", "n2", "n3", "n4"]
            config = work / "several.toml"
            config.write_text(
                f'state_dir = "{work / "several"}"\n[defaults]\nauthkey_path = "{work / "authkey"}"\n'
                + "".join(service_toml(n, f"http://127.0.0.1:{echo_port}") for n in names)
            )
            async with hand_started(
                ["--config", str(config)], env, work / "several.log", work / "several" / "sidecar.sock"
            ) as several:
                with trio.fail_after(120):
                    await several.wait(all_running(set(names)))
                seen["stop_several_nodes"] = list(await stop_timed(several))
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return seen
