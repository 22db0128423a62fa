"""Start the real `harmonia-cache` for a test: a key pair, a config file, a process, its URL.

    with start_cache(tmp_path, priority=60) as cache:
        cache.url            # http://127.0.0.1:PORT
        cache.public_key     # name:base64, for trusted-public-keys
        cache.secret_key_file
        cache.proc           # the subprocess.Popen

Config keyword arguments are harmonia's TOML keys (bind, workers, priority, enable_compression,
zstd={"level": 3}, store_backend, …). The server binds 127.0.0.1:0 unless told otherwise and the
URL comes from its `listening on …` log line.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache.keys import write_key_pair
from cache.launch import running


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # 0.5, 3.4e-05: both TOML floats
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def render_toml(config: Mapping[str, Any]) -> str:
    lines, tables = [], []
    for key, value in config.items():
        if isinstance(value, dict):
            tables.append(f"[{key}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in value.items()))
        else:
            lines.append(f"{key} = {toml_value(value)}\n")
    return "".join(lines) + "\n".join(tables)


@dataclass
class CacheServer:
    url: str
    public_key: str
    secret_key_file: Path
    config_file: Path
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    @property
    def hostport(self) -> str:
        return self.url.split("://", 1)[1]


def generate_key(directory: Path, name: str = "test-cache-1") -> tuple[Path, str]:
    secret = directory / f"{name}.secret"
    public = directory / f"{name}.public"
    if not secret.exists():
        write_key_pair(name, secret, public)
    return secret, public.read_text().strip()


@contextmanager
def start_cache(
    tmp_path: Path,
    *,
    key_name: str = "test-cache-1",
    env: Mapping[str, str] | None = None,
    timeout: float = 30,
    **config: Any,
) -> Iterator[CacheServer]:
    """Run harmonia-cache until the block ends (SIGTERM, then SIGKILL after 10 s)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    secret, public = generate_key(tmp_path, key_name)
    settings: dict[str, Any] = {
        "bind": "127.0.0.1:0",
        "workers": 1,
        "sign_key_paths": [str(secret)],
        "state_directory": str(tmp_path / "state"),
    }
    settings.update(config)
    config_file = tmp_path / "harmonia.toml"
    config_file.write_text(render_toml(settings))
    with running(config_file, env=env, timeout=timeout, cwd=Path(__file__).resolve().parents[2]) as server:
        yield CacheServer(server.url, public, secret, config_file, server.proc, server.lines)
