"""The cache's configuration: harmonia's TOML keys and environment variables, checked at once.

`Config` is its own schema: each field's metadata (`setting(check)`) names its TOML key (the field's
own name, or `table.name` for a key inside a table: `zstd_level` is `[zstd] level`) and the small
check turning a TOML value into the field's value. `config_from_mapping` derives the known keys from
the fields, rejects unknown ones (a typo would otherwise silently fall back to a default) and
reports every problem at once in one `ConfigError`, each `Problem` naming its key. Adding a key is
adding a field; nothing else lists keys. The rules between fields (a TLS certificate needs its key,
harmonia's environment variables) are the small functions after the checks.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from common.problems import ConfigError, Problem

from .push.config import PushConfig, absolute_path, positive_number, public_keys
from .signing import PublicKey

__all__ = [
    "DEFAULT_BIND",
    "Bind",
    "Config",
    "ConfigError",
    "LogLevel",
    "NarSource",
    "Problem",
    "StoreBackend",
    "config_from_mapping",
    "known_keys",
    "load_config",
    "parse_bind",
    "setting",
]

DEFAULT_BIND = "[::]:5000"

StoreBackend = Literal["db", "daemon"]
#: with the daemon backend: "auto" (NARs from the store's files when readable) or "daemon"
NarSource = Literal["auto", "daemon"]
LogLevel = Literal["debug", "info", "warning", "error"]

#: A check turns a TOML value into a field's value, or raises ValueError saying what is wrong
#: (without the key: the caller adds it).
Check = Callable[[object], Any]


@dataclass(frozen=True, slots=True)
class Setting:
    """Where a field comes from in the TOML file and how its value is checked."""

    check: Check
    key: str | None = None  # None: the field's name; "table.name": a key inside [table]


def setting(check: Check, key: str | None = None) -> dict[str, Setting]:
    """A field's metadata: ``field(default=…, metadata=setting(integer(1, 256)))``."""
    return {"setting": Setting(check, key)}


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


# --------------------------------------------------------------------------- checks, one per kind


def integer(lo: int, hi: int) -> Check:
    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"expected an integer from {lo} to {hi}, got {value!r}")
        return value

    return check


def text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def file_path(value: object) -> Path:
    return Path(text(value))


def store_dir(value: object) -> str:
    path = text(value)
    if not path.startswith("/"):
        raise ValueError(f"must be an absolute path, got {path!r}")
    return path.rstrip("/") or "/"


def bind_address(value: object) -> Bind:
    return parse_bind(text(value))


def file_paths(value: object) -> tuple[Path, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("expected a list of file paths")
    return tuple(Path(v) for v in value)


def one_of(options: object, spelled: str, *, fold_case: bool = False) -> Check:
    """One of a Literal's values (``spelled`` lists them for the message)."""
    allowed = get_args(options)

    def check(value: object) -> str:
        given = text(value)
        candidate = given.lower() if fold_case else given
        if candidate not in allowed:
            raise ValueError(f"expected {spelled}, got {given!r}")
        return candidate

    return check


@dataclass(frozen=True, slots=True)
class Config:
    bind: Bind = field(default_factory=lambda: parse_bind(DEFAULT_BIND), metadata=setting(bind_address))
    workers: int = field(
        default_factory=lambda: max(1, os.cpu_count() or 1), metadata=setting(integer(1, 256))
    )
    max_connection_rate: int = field(default=256, metadata=setting(integer(1, 1_000_000)))
    max_connections: int = field(default=25_000, metadata=setting(integer(1, 1_000_000)))
    priority: int = field(default=30, metadata=setting(integer(0, 10_000)))
    virtual_nix_store: str = field(default="/nix/store", metadata=setting(store_dir))
    #: defaults to virtual_nix_store when only that is given (see _real_store_follows_virtual)
    real_nix_store: str = field(default="/nix/store", metadata=setting(store_dir))
    enable_compression: bool = field(default=True, metadata=setting(boolean))
    zstd_level: int = field(default=3, metadata=setting(integer(1, 22), key="zstd.level"))
    #: harmonia's sign_key_path (one file) and SIGN_KEY_PATHS / SIGN_KEY_PATH add to these
    sign_key_paths: tuple[Path, ...] = field(default=(), metadata=setting(file_paths))
    tls_cert_path: Path | None = field(default=None, metadata=setting(file_path))
    tls_key_path: Path | None = field(default=None, metadata=setting(file_path))
    nix_db_path: Path = field(default=Path("/nix/var/nix/db/db.sqlite"), metadata=setting(file_path))
    store_backend: StoreBackend = field(
        default="db", metadata=setting(one_of(StoreBackend, '"db" or "daemon"'))
    )
    nar_source: NarSource = field(default="auto", metadata=setting(one_of(NarSource, '"auto" or "daemon"')))
    daemon_socket: Path = field(
        default=Path("/nix/var/nix/daemon-socket/socket"), metadata=setting(file_path)
    )
    #: defaults to $STATE_DIRECTORY (systemd's), see _state_directory_from_env
    state_directory: Path | None = field(default=None, metadata=setting(file_path))
    compressed_cache_max_bytes: int = field(default=20 * 1024**3, metadata=setting(integer(0, 1 << 50)))
    narinfo_cache_entries: int = field(default=65536, metadata=setting(integer(0, 10_000_000)))
    log_level: LogLevel = field(
        default="info",
        metadata=setting(one_of(LogLevel, "debug, info, warning or error", fold_case=True)),
    )
    # [push]: `nix copy --to …/push` (cache/push/); off unless enabled
    push_enable: bool = field(default=False, metadata=setting(boolean, key="push.enable"))
    push_retention_days: float = field(
        default=30.0, metadata=setting(positive_number(36500), key="push.retention_days")
    )
    #: the pushers' public keys (name:base64); a pushed narinfo needs a Sig by one of them
    push_trusted_keys: tuple[PublicKey, ...] = field(
        default=(), metadata=setting(public_keys, key="push.trusted_keys")
    )
    push_max_nar_bytes: int = field(
        default=8 * 1024**3, metadata=setting(integer(1, 1 << 50), key="push.max_nar_bytes")
    )
    #: default <state_directory>/push/tokens.json
    push_tokens_file: Path | None = field(
        default=None, metadata=setting(absolute_path, key="push.tokens_file")
    )
    #: seconds without a byte of a request body before the upload is refused
    push_idle_timeout: float = field(
        default=30.0, metadata=setting(positive_number(86400), key="push.idle_timeout")
    )
    #: seconds between sweeps of expired retention roots
    push_sweep_interval: float = field(
        default=3600.0, metadata=setting(positive_number(30 * 86400), key="push.sweep_interval")
    )

    @property
    def tls(self) -> bool:
        return self.tls_cert_path is not None

    @property
    def push(self) -> PushConfig:
        return PushConfig(
            enable=self.push_enable,
            retention_days=self.push_retention_days,
            trusted_keys=self.push_trusted_keys,
            max_nar_bytes=self.push_max_nar_bytes,
            tokens_file=self.push_tokens_file,
            idle_timeout=self.push_idle_timeout,
            sweep_interval=self.push_sweep_interval,
        )


#: Keys that are not fields of their own: harmonia's single-file spelling adds to sign_key_paths.
ALIASES: dict[str, tuple[str, Check]] = {"sign_key_path": ("sign_key_paths", lambda v: (file_path(v),))}


def _toml_key(f: Field[Any]) -> str:
    spec: Setting = f.metadata["setting"]
    return spec.key or f.name


def _toml_literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def known_keys() -> dict[str, tuple[str, ...]]:
    """The top-level keys, derived from Config's fields: key → the names inside it if a table."""
    out: dict[str, tuple[str, ...]] = {}
    for f in fields(Config):
        table, dot, name = _toml_key(f).partition(".")
        out[table] = (*out.get(table, ()), name) if dot else ()
    for alias in ALIASES:
        out[alias] = ()
    return out


def _read_fields(raw: Mapping[str, Any], problems: list[Problem]) -> dict[str, Any]:
    """Each field's checked value where the file gives it; unknown keys become problems."""
    known = known_keys()
    for key in sorted(set(raw) - set(known)):
        problems.append(Problem(key, f"unknown key (known keys: {', '.join(sorted(known))})"))
    tables: dict[str, Mapping[str, Any]] = {}
    for table, names in known.items():
        if not names or table not in raw:
            continue
        if isinstance(raw[table], dict):
            tables[table] = raw[table]
            for key in sorted(set(raw[table]) - set(names)):
                problems.append(Problem(f"{table}.{key}", f"unknown key (known keys: {', '.join(names)})"))
        else:
            first = next(f for f in fields(Config) if _toml_key(f) == f"{table}.{names[0]}")
            example = f"[{table}] {names[0]} = {_toml_literal(first.default)}"
            problems.append(Problem(table, f"expected a table like {example}"))
    values: dict[str, Any] = {}
    for f in fields(Config):
        key = _toml_key(f)
        table, dot, name = key.partition(".")
        source = tables.get(table, {}) if dot else raw
        if (name if dot else key) not in source:
            continue
        try:
            values[f.name] = f.metadata["setting"].check(source[name if dot else key])
        except ValueError as exc:
            problems.append(Problem(key, str(exc)))
    for alias, (target, check) in ALIASES.items():
        if alias in raw:
            try:
                values[target] = values.get(target, ()) + check(raw[alias])
            except ValueError as exc:
                problems.append(Problem(alias, str(exc)))
    return values


# --------------------------------------------------------------------------- rules between fields


def _real_store_follows_virtual(values: dict[str, Any]) -> None:
    if "real_nix_store" not in values and "virtual_nix_store" in values:
        values["real_nix_store"] = values["virtual_nix_store"]


def _tls_pair(values: Mapping[str, Any], problems: list[Problem]) -> None:
    if ("tls_cert_path" in values) != ("tls_key_path" in values):
        problems.append(Problem("tls_cert_path, tls_key_path", "set both or neither"))


def _sign_keys_from_env(values: dict[str, Any], env: Mapping[str, str]) -> None:
    # harmonia's environment variables add to the file's keys (systemd credentials use them)
    keys = [*values.get("sign_key_paths", ())]
    keys += [Path(p) for p in env.get("SIGN_KEY_PATHS", "").split()]
    keys += [Path(p) for p in env.get("SIGN_KEY_PATH", "").split()]
    values["sign_key_paths"] = tuple(dict.fromkeys(keys))


def _state_directory_from_env(values: dict[str, Any], env: Mapping[str, str]) -> None:
    if "state_directory" not in values and env.get("STATE_DIRECTORY"):
        values["state_directory"] = Path(env["STATE_DIRECTORY"].split(":")[0])


def _push_needs_keys(values: Mapping[str, Any], problems: list[Problem]) -> None:
    reported = any(p.key == "push.trusted_keys" for p in problems)
    if values.get("push_enable") and not values.get("push_trusted_keys") and not reported:
        problems.append(
            Problem(
                "push.trusted_keys", "push is enabled but no key is trusted; list the pushers' public keys"
            )
        )


def config_from_mapping(raw: Mapping[str, Any], env: Mapping[str, str]) -> Config:
    """Build a Config from parsed TOML plus the environment; every problem reported at once."""
    problems: list[Problem] = []
    values = _read_fields(raw, problems)
    _real_store_follows_virtual(values)
    _tls_pair(values, problems)
    _push_needs_keys(values, problems)
    _sign_keys_from_env(values, env)
    _state_directory_from_env(values, env)
    if problems:
        raise ConfigError(problems)
    return Config(**values)


def load_config(path: str | Path | None, env: Mapping[str, str]) -> Config:
    """From `path`, else `$CONFIG_FILE`, else defaults (serve the local store)."""
    source = path if path is not None else env.get("CONFIG_FILE") or None
    raw: dict[str, Any] = {}
    if source is not None:
        where = f"config file {source}"
        try:
            with open(source, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError as exc:
            raise ConfigError([Problem(where, "not found")]) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([Problem(where, f"not valid TOML: {exc}")]) from exc
        except OSError as exc:
            raise ConfigError([Problem(where, str(exc.strerror))]) from exc
    return config_from_mapping(raw, env)
