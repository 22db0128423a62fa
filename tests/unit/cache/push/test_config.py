from pathlib import Path

import pytest

from cache.config import ConfigError, config_from_mapping
from cache.push.config import PushConfig, tokens_path
from cache.signing import SecretKey

KEY = str(SecretKey.generate("builder-1").public_key())


def test_off_by_default() -> None:
    assert config_from_mapping({}, {}).push == PushConfig()
    assert not PushConfig().enable


def test_push_table() -> None:
    cfg = config_from_mapping(
        {
            "push": {
                "enable": True,
                "retention_days": 0.5,
                "trusted_keys": [KEY],
                "max_nar_bytes": 1000,
                "idle_timeout": 5,
                "sweep_interval": 60,
                "tokens_file": "/etc/harmonia/tokens.json",
            }
        },
        {},
    ).push
    assert cfg.enable and cfg.retention_seconds == 43200
    assert [str(k) for k in cfg.trusted_keys] == [KEY]
    assert (cfg.max_nar_bytes, cfg.idle_timeout, cfg.sweep_interval) == (1000, 5.0, 60.0)
    assert tokens_path(cfg, Path("/var/lib/harmonia")) == Path("/etc/harmonia/tokens.json")


def test_tokens_live_under_the_state_directory_by_default() -> None:
    assert tokens_path(PushConfig(), Path("/var/lib/harmonia")) == Path("/var/lib/harmonia/push/tokens.json")


def test_every_push_problem_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(
            {
                "push": {
                    "enable": "yes",
                    "retention_days": 0,
                    "trusted_keys": ["nokey", KEY],
                    "max_nar_bytes": -1,
                    "tokens_file": "relative",
                    "retention": 3,
                }
            },
            {},
        )
    text = "\n".join(str(p) for p in info.value.problems)
    for key in ("push.enable", "push.retention_days", "push.trusted_keys", "push.max_nar_bytes",
                "push.tokens_file", "push.retention: unknown key"):  # fmt: skip
        assert key in text


def test_push_must_be_a_table() -> None:
    with pytest.raises(ConfigError, match=r"push: expected a table like \[push\] enable = false"):
        config_from_mapping({"push": True}, {})


def test_enabled_without_keys_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"push.trusted_keys: push is enabled but no key is trusted"):
        config_from_mapping({"push": {"enable": True}}, {})
