"""The two servers side by side: Debian's Caddy `file_server` on the static export, and harmonia-cache."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache.keys import write_key_pair
from cache.launch import running, stop


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen[Any]


def _free_port() -> int:
    # Caddy cannot report the port it bound, so it gets one picked here (loopback only)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: str, netns: str | None) -> bool:
    if netns is not None:
        # any HTTP answer will do: an empty export has no nix-cache-info yet
        probe = ["ip", "netns", "exec", netns, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}"]
        out = subprocess.run([*probe, url + "/nix-cache-info"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() not in ("", "000")
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/nix-cache-info", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _wait_http(url: str, proc: subprocess.Popen[Any], timeout: float = 30, netns: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        if _answers(url, netns):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout}s")
        time.sleep(0.1)


@contextmanager
def caddy_file_server(
    root: Path,
    state: Path,
    host: str = "127.0.0.1",
    netns: str | None = None,
    name: str = "caddy file_server",
) -> Iterator[Server]:
    caddy = shutil.which("caddy")
    if caddy is None:
        raise RuntimeError("Debian's caddy is not installed (./bootstrap bench installs it)")
    port = _free_port()  # free on loopback; a fresh namespace has every port free
    state.mkdir(parents=True, exist_ok=True)
    config = state / "Caddyfile"
    config.write_text(
        "{\n\tadmin off\n\tauto_https off\n}\n"
        f"http://{host}:{port} {{\n\troot * {root}\n\tfile_server\n}}\n"
    )
    env = dict(
        os.environ, HOME=str(state), XDG_DATA_HOME=str(state / "data"), XDG_CONFIG_HOME=str(state / "config")
    )
    proc = subprocess.Popen(
        [
            *(["ip", "netns", "exec", netns] if netns else []),
            caddy,
            "run",
            "--config",
            str(config),
            "--adapter",
            "caddyfile",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        url = f"http://{host}:{port}"
        _wait_http(url, proc, netns=netns)
        yield Server(name, url, proc)
    finally:
        stop(proc, 15)


@contextmanager
def harmonia_cache(
    state: Path, workers: int, backend: str = "db", host: str = "127.0.0.1", netns: str | None = None
) -> Iterator[Server]:
    state.mkdir(parents=True, exist_ok=True)
    secret = state / "secret-key"
    if not secret.exists():
        write_key_pair("bench-1", secret, state / "public-key")
    config = state / "harmonia.toml"
    config.write_text(
        f'bind = "{host}:0"\nworkers = {workers}\npriority = 60\nstore_backend = "{backend}"\n'
        f'sign_key_paths = ["{secret}"]\nstate_directory = "{state}"\n[zstd]\nlevel = 3\n'
    )
    with running(config, netns=netns) as launched:
        _wait_http(launched.url, launched.proc, netns=netns)
        yield Server(f"harmonia-cache ({backend})", launched.url, launched.proc)
