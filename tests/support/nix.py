"""The real Nix, driven from tests: environment, daemon, fixtures built in the store.

Every client gets its own XDG_CACHE_HOME, because Nix caches narinfo look-ups
(positive for 30 days, negative for an hour) and a shared cache makes tests see stale answers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

DAEMON_SOCKET = Path("/nix/var/nix/daemon-socket/socket")
BASE_NIX_CONFIG = "experimental-features = nix-command\nsubstituters =\n"


def have_nix() -> bool:
    return shutil.which("nix") is not None and shutil.which("nix-store") is not None


def nix_env(cache_home: Path, extra_config: str = "", **extra: str) -> dict[str, str]:
    """Environment for one Nix client: its own narinfo cache and the base settings."""
    cache_home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["XDG_CACHE_HOME"] = str(cache_home)
    env["NIX_CONFIG"] = BASE_NIX_CONFIG + extra_config
    env.update(extra)
    return env


def run(
    args: list[str], env: Mapping[str, str] | None = None, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        args,
        env=dict(env) if env is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def daemon_answers(env: Mapping[str, str]) -> bool:
    probe = dict(env, NIX_REMOTE="daemon")
    return run(["nix", "store", "ping"], env=probe, timeout=20, check=False).returncode == 0


@contextmanager
def running_daemon(state: Path) -> Iterator[dict[str, str]]:
    """Use the machine's nix-daemon if one answers; otherwise start one and stop it afterwards."""
    env = nix_env(state / "daemon-cache")
    if daemon_answers(env):
        yield env
        return
    if DAEMON_SOCKET.exists():
        DAEMON_SOCKET.unlink()  # a stale socket from an earlier run refuses connections
    log = (state / "nix-daemon.log").open("wb")
    proc = subprocess.Popen(
        ["nix-daemon"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 30
        while not daemon_answers(env):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nix-daemon did not start; see {state / 'nix-daemon.log'}")
            time.sleep(0.1)
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def build(expr: str, env: Mapping[str, str], out_link: Path | None = None) -> list[str]:
    """Build a Nix expression in the real store; return its output paths."""
    args = ["nix-build", "-E", expr]
    args += ["--out-link", str(out_link)] if out_link else ["--no-out-link"]
    return run(args, env=env, timeout=600).stdout.split()


def path_info(path: str, env: Mapping[str, str], store: str | None = None) -> dict[str, object]:
    args = ["nix", "path-info", "--json", path]
    if store:
        args += ["--store", store]
    info = json.loads(run(args, env=env).stdout)
    found: dict[str, object] = info[0] if isinstance(info, list) else info[path]
    return found


def dump(path: str, env: Mapping[str, str]) -> bytes:
    return subprocess.run(
        ["nix-store", "--dump", path], env=dict(env), capture_output=True, check=True, timeout=300
    ).stdout
