"""The real Nix, driven from tests: environment, daemon, fixtures built in the store.

Every client gets its own XDG_CACHE_HOME, because Nix caches narinfo look-ups
(positive for 30 days, negative for an hour) and a shared cache makes tests see stale answers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from cache.launch import nix_daemon

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
    args: list[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
    check: bool = True,
    label: str = "",
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
            f"{label}{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


@contextmanager
def running_daemon(state: Path) -> Iterator[dict[str, str]]:
    """Use the machine's nix-daemon if one answers; otherwise start one and stop it afterwards."""
    env = nix_env(state / "daemon-cache")
    with nix_daemon(state, env):
        yield env


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
