"""The `[push]` table: off by default; everything a push route checks before it reads a body.

Kept as its own small dataclass so the main configuration embeds it as one field
(`Config.push`), and so its checks report every problem at once with the `push.` prefix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..signing import KeyFormatError, PublicKey

DAY = 86400.0


@dataclass(frozen=True, slots=True)
class PushConfig:
    enable: bool = False
    retention_days: float = 30.0
    trusted_keys: tuple[PublicKey, ...] = ()
    max_nar_bytes: int = 8 * 1024**3
    # None: <state_directory>/push/tokens.json
    tokens_file: Path | None = None
    idle_timeout: float = 60.0  # seconds without a byte of a request body
    sweep_interval: float = 3600.0  # seconds between removals of expired retention roots

    @property
    def retention_seconds(self) -> float:
        return self.retention_days * DAY


KEYS = (
    "enable", "retention_days", "trusted_keys", "max_nar_bytes", "tokens_file", "idle_timeout",
    "sweep_interval",
)  # fmt: skip


def _number(raw: Mapping[str, Any], key: str, lo: float, hi: float, problems: list[str]) -> float | None:
    if key not in raw:
        return None
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo < value <= hi:
        problems.append(f"push.{key}: expected a number above {lo:g} and at most {hi:g}, got {value!r}")
        return None
    return float(value)


def push_config_from_mapping(raw: object, problems: list[str]) -> PushConfig:
    """The `[push]` table; problems are appended (each naming its `push.` key), never raised."""
    if not isinstance(raw, Mapping):
        problems.append("push: expected a table like [push] enable = true")
        return PushConfig()
    kw: dict[str, Any] = {}
    for key in sorted(set(raw) - set(KEYS)):
        problems.append(f"push.{key}: unknown key (known keys: {', '.join(sorted(KEYS))})")
    if "enable" in raw:
        if isinstance(raw["enable"], bool):
            kw["enable"] = raw["enable"]
        else:
            problems.append(f"push.enable: expected true or false, got {raw['enable']!r}")
    if (days := _number(raw, "retention_days", 0, 36500, problems)) is not None:
        kw["retention_days"] = days
    if (idle := _number(raw, "idle_timeout", 0, 86400, problems)) is not None:
        kw["idle_timeout"] = idle
    if (sweep := _number(raw, "sweep_interval", 0, 86400 * 30, problems)) is not None:
        kw["sweep_interval"] = sweep
    if "max_nar_bytes" in raw:
        value = raw["max_nar_bytes"]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 1 << 50:
            problems.append(f"push.max_nar_bytes: expected a positive integer (bytes), got {value!r}")
        else:
            kw["max_nar_bytes"] = value
    if "tokens_file" in raw:
        value = raw["tokens_file"]
        if not isinstance(value, str) or not value.startswith("/"):
            problems.append(f"push.tokens_file: expected an absolute path, got {value!r}")
        else:
            kw["tokens_file"] = Path(value)
    if "trusted_keys" in raw:
        value = raw["trusted_keys"]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.append('push.trusted_keys: expected a list of public keys ("name:base64")')
        else:
            keys: list[PublicKey] = []
            for text in value:
                try:
                    keys.append(PublicKey.parse(text))
                except KeyFormatError as exc:
                    problems.append(f"push.trusted_keys: {exc}")
            kw["trusted_keys"] = tuple(keys)
    config = PushConfig(**kw)
    if (
        config.enable
        and not config.trusted_keys
        and not any(p.startswith("push.trusted_keys") for p in problems)
    ):
        problems.append(
            "push.trusted_keys: push is enabled but no key is trusted; list the pushers' public keys"
        )
    return config


def tokens_path(config: PushConfig, state_directory: Path) -> Path:
    return config.tokens_file if config.tokens_file is not None else state_directory / "push" / "tokens.json"
