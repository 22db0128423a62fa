"""The cache's configuration: harmonia's TOML keys and environment variables, checked at once.

`load_config` reports every problem in one `ConfigError` naming each key; an unknown key is an
error (a typo would otherwise silently fall back to a default).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .push.config import PushConfig, push_config_from_mapping

DEFAULT_BIND = "[::]:5000"


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True, slots=True)
class Bind:
    """`host:port` (host may be `[v6]`), or `unix:/path`."""

    host: str | None = None
    port: int | None = None
    unix_path: str | None = None

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_bind(text: str) -> Bind:
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ValueError("unix: needs a path")
        return Bind(unix_path=path)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not host:port, [ipv6]:port or unix:/path")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(f"{text!r} has no host")
    return Bind(host=host, port=int(port))


@dataclass(frozen=True, slots=True)
class Config:
    bind: Bind = field(default_factory=lambda: parse_bind(DEFAULT_BIND))
    workers: int = field(default_factory=lambda: max(1, os.cpu_count() or 1))
    max_connection_rate: int = 256
    max_connections: int = 25_000
    priority: int = 30
    virtual_nix_store: str = "/nix/store"
    real_nix_store: str = "/nix/store"
    enable_compression: bool = True
    zstd_level: int = 3
    sign_key_paths: tuple[Path, ...] = ()
    tls_cert_path: Path | None = None
    tls_key_path: Path | None = None
    nix_db_path: Path = Path("/nix/var/nix/db/db.sqlite")
    store_backend: str = "db"
    nar_source: str = "auto"  # with the daemon backend: "auto" (files when readable) or "daemon"
    daemon_socket: Path = Path("/nix/var/nix/daemon-socket/socket")
    state_directory: Path | None = None
    compressed_cache_max_bytes: int = 20 * 1024**3
    narinfo_cache_entries: int = 65536
    log_level: str = "info"
    push: PushConfig = field(default_factory=PushConfig)

    @property
    def tls(self) -> bool:
        return self.tls_cert_path is not None


_KEYS = {
    "bind", "workers", "max_connection_rate", "max_connections", "priority",
    "virtual_nix_store", "real_nix_store", "enable_compression", "zstd", "sign_key_paths",
    "sign_key_path", "tls_cert_path", "tls_key_path", "nix_db_path", "store_backend",
    "daemon_socket", "nar_source", "state_directory", "compressed_cache_max_bytes", "narinfo_cache_entries",
    "log_level", "push",
}  # fmt: skip


def _int(raw: Mapping[str, Any], key: str, lo: int, hi: int, problems: list[str]) -> int | None:
    if key not in raw:
        return None
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        problems.append(f"{key}: expected an integer from {lo} to {hi}, got {value!r}")
        return None
    return value


def _str(raw: Mapping[str, Any], key: str, problems: list[str]) -> str | None:
    if key not in raw:
        return None
    value = raw[key]
    if not isinstance(value, str) or not value:
        problems.append(f"{key}: expected a non-empty string, got {value!r}")
        return None
    return value


def config_from_mapping(raw: Mapping[str, Any], env: Mapping[str, str]) -> Config:
    """Build a Config from parsed TOML plus the environment; every problem reported at once."""
    problems: list[str] = []
    kw: dict[str, Any] = {}
    for key in sorted(set(raw) - _KEYS):
        problems.append(f"{key}: unknown key (known keys: {', '.join(sorted(_KEYS))})")

    if (bind := _str(raw, "bind", problems)) is not None:
        try:
            kw["bind"] = parse_bind(bind)
        except ValueError as exc:
            problems.append(f"bind: {exc}")
    for key, lo, hi in (
        ("workers", 1, 256),
        ("max_connection_rate", 1, 1_000_000),
        ("max_connections", 1, 1_000_000),
        ("priority", 0, 10_000),
        ("compressed_cache_max_bytes", 0, 1 << 50),
        ("narinfo_cache_entries", 0, 10_000_000),
    ):
        if (value := _int(raw, key, lo, hi, problems)) is not None:
            kw[key] = value
    for key in ("virtual_nix_store", "real_nix_store"):
        if (value_s := _str(raw, key, problems)) is not None:
            if not value_s.startswith("/"):
                problems.append(f"{key}: must be an absolute path, got {value_s!r}")
            else:
                kw[key] = value_s.rstrip("/") or "/"
    if "real_nix_store" not in kw and "virtual_nix_store" in kw:
        kw["real_nix_store"] = kw["virtual_nix_store"]
    if "enable_compression" in raw:
        if isinstance(raw["enable_compression"], bool):
            kw["enable_compression"] = raw["enable_compression"]
        else:
            problems.append(f"enable_compression: expected true or false, got {raw['enable_compression']!r}")
    if "zstd" in raw:
        zstd = raw["zstd"]
        if not isinstance(zstd, dict):
            problems.append("zstd: expected a table like [zstd] level = 3")
        else:
            for key in sorted(set(zstd) - {"level"}):
                problems.append(f"zstd.{key}: unknown key (known keys: level)")
            if (level := _int(zstd, "level", 1, 22, [])) is not None:
                kw["zstd_level"] = level
            elif "level" in zstd:
                problems.append(f"zstd.level: expected an integer from 1 to 22, got {zstd['level']!r}")
    for key in ("tls_cert_path", "tls_key_path", "nix_db_path", "daemon_socket", "state_directory"):
        if (value_s := _str(raw, key, problems)) is not None:
            kw[key] = Path(value_s)
    if ("tls_cert_path" in kw) != ("tls_key_path" in kw):
        problems.append("tls_cert_path, tls_key_path: set both or neither")
    if (backend := _str(raw, "store_backend", problems)) is not None:
        if backend not in ("db", "daemon"):
            problems.append(f'store_backend: expected "db" or "daemon", got {backend!r}')
        else:
            kw["store_backend"] = backend
    if (source := _str(raw, "nar_source", problems)) is not None:
        if source not in ("auto", "daemon"):
            problems.append(f'nar_source: expected "auto" or "daemon", got {source!r}')
        else:
            kw["nar_source"] = source
    if (level_s := _str(raw, "log_level", problems)) is not None:
        if level_s.lower() not in ("debug", "info", "warning", "error"):
            problems.append(f"log_level: expected debug, info, warning or error, got {level_s!r}")
        else:
            kw["log_level"] = level_s.lower()

    keys: list[Path] = []
    if "sign_key_paths" in raw:
        value = raw["sign_key_paths"]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            problems.append("sign_key_paths: expected a list of file paths")
        else:
            keys += [Path(v) for v in value]
    if (single := _str(raw, "sign_key_path", problems)) is not None:
        keys.append(Path(single))
    # harmonia's environment variables add to the file's keys (systemd credentials use them)
    keys += [Path(p) for p in env.get("SIGN_KEY_PATHS", "").split()]
    keys += [Path(p) for p in env.get("SIGN_KEY_PATH", "").split()]
    kw["sign_key_paths"] = tuple(dict.fromkeys(keys))

    if "push" in raw:
        kw["push"] = push_config_from_mapping(raw["push"], problems)
    if "state_directory" not in kw and env.get("STATE_DIRECTORY"):
        kw["state_directory"] = Path(env["STATE_DIRECTORY"].split(":")[0])
    if problems:
        raise ConfigError(problems)
    return Config(**kw)


def load_config(path: str | Path | None, env: Mapping[str, str]) -> Config:
    """From `path`, else `$CONFIG_FILE`, else defaults (serve the local store)."""
    source = path if path is not None else env.get("CONFIG_FILE") or None
    raw: dict[str, Any] = {}
    if source is not None:
        try:
            with open(source, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError as exc:
            raise ConfigError([f"config file {source}: not found"]) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"config file {source}: not valid TOML: {exc}"]) from exc
        except OSError as exc:
            raise ConfigError([f"config file {source}: {exc.strerror}"]) from exc
    return config_from_mapping(raw, env)
