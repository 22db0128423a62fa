"""The `[push]` table: off by default; everything a push route checks before it reads a body.

`Config` holds the `push.*` keys as its own fields (one check each, below); `Config.push` gathers
them into this small dataclass, which is all the push code sees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
    idle_timeout: float = 30.0  # seconds without a byte of a request body
    sweep_interval: float = 3600.0  # seconds between removals of expired retention roots

    @property
    def retention_seconds(self) -> float:
        return self.retention_days * DAY


def positive_number(hi: float) -> Callable[[object], float]:
    """A number above 0 and at most `hi` (int or float: `retention_days = 0.5` is allowed)."""

    def check(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= hi:
            raise ValueError(f"expected a number above 0 and at most {hi:g}, got {value!r}")
        return float(value)

    return check


def absolute_path(value: object) -> Path:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"expected an absolute path, got {value!r}")
    return Path(value)


def public_keys(value: object) -> tuple[PublicKey, ...]:
    """A list of `name:base64` public keys; every bad one is named in the one error."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError('expected a list of public keys ("name:base64")')
    keys: list[PublicKey] = []
    bad: list[str] = []
    for text in value:
        try:
            keys.append(PublicKey.parse(text))
        except KeyFormatError as exc:
            bad.append(str(exc))
    if bad:
        raise ValueError("; ".join(bad))
    return tuple(keys)


def tokens_path(config: PushConfig, state_directory: Path) -> Path:
    return config.tokens_file if config.tokens_file is not None else state_directory / "push" / "tokens.json"
