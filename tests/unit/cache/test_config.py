from dataclasses import fields
from pathlib import Path
from typing import get_args

import pytest

from cache.config import (
    Bind,
    Config,
    ConfigError,
    LogLevel,
    StoreBackend,
    config_from_mapping,
    known_keys,
    load_config,
    parse_bind,
)
from common.problems import Problem


def test_defaults_serve_the_local_store() -> None:
    cfg = config_from_mapping({}, {})
    assert str(cfg.bind) == "[::]:5000"
    assert cfg.virtual_nix_store == cfg.real_nix_store == "/nix/store"
    assert cfg.sign_key_paths == ()


def test_harmonia_keys() -> None:
    cfg = config_from_mapping(
        {
            "bind": "127.0.0.1:5001",
            "workers": 2,
            "max_connection_rate": 10,
            "max_connections": 7,
            "priority": 60,
            "virtual_nix_store": "/nix/store",
            "real_nix_store": "/mnt/nix/store",
            "enable_compression": False,
            "zstd": {"level": 5},
            "sign_key_paths": ["/k1"],
            "nix_db_path": "/mnt/nix/var/nix/db/db.sqlite",
        },
        {"SIGN_KEY_PATHS": "/k2 /k3"},
    )
    assert cfg.bind == Bind("127.0.0.1", 5001)
    assert (cfg.workers, cfg.max_connection_rate, cfg.max_connections, cfg.priority) == (2, 10, 7, 60)
    assert cfg.real_nix_store == "/mnt/nix/store"
    assert cfg.zstd_level == 5
    assert not cfg.enable_compression
    assert cfg.sign_key_paths == (Path("/k1"), Path("/k2"), Path("/k3"))


def test_nar_source() -> None:
    assert config_from_mapping({"store_backend": "daemon"}, {}).nar_source == "auto"
    assert config_from_mapping({"nar_source": "daemon"}, {}).nar_source == "daemon"
    with pytest.raises(ConfigError, match=r"nar_source"):
        config_from_mapping({"nar_source": "files"}, {})


def test_every_problem_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(
            {
                "bind": "nonsense",
                "workers": 0,
                "priorty": 5,
                "enable_compression": "yes",
                "zstd": {"level": 99, "speed": 1},
                "tls_cert_path": "/c",
                "store_backend": "s3",
            },
            {},
        )
    text = str(info.value)
    for key in (
        "bind:",
        "workers:",
        "priorty: unknown key",
        "enable_compression:",
        "zstd.level:",
        "zstd.speed: unknown key",
        "tls_cert_path, tls_key_path",
        "store_backend:",
    ):
        assert key in text, key
    assert len(info.value.problems) == 8


@pytest.mark.parametrize(
    ("text", "bind"),
    [
        ("[::]:5000", Bind("::", 5000)),
        ("127.0.0.1:0", Bind("127.0.0.1", 0)),
        ("[::1]:80", Bind("::1", 80)),
        ("unix:/run/h.sock", Bind(unix_path="/run/h.sock")),
    ],
)
def test_bind_forms(text: str, bind: Bind) -> None:
    assert parse_bind(text) == bind


@pytest.mark.parametrize("text", ["5000", ":5000", "host:99999", "unix:", "host:port"])
def test_bad_binds(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_bind(text)


def test_config_file_through_env(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('priority = 60\nbind = "unix:/tmp/x.sock"\n')
    assert load_config(None, {"CONFIG_FILE": str(f)}).priority == 60


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("priority = \n")
    with pytest.raises(ConfigError, match=r"not valid TOML"):
        load_config(f, {})
    with pytest.raises(ConfigError, match=r"not found"):
        load_config(tmp_path / "missing.toml", {})


def test_state_directory_from_systemd() -> None:
    assert config_from_mapping({}, {"STATE_DIRECTORY": "/var/lib/harmonia"}).state_directory == Path(
        "/var/lib/harmonia"
    )


def test_keys_are_derived_from_the_fields() -> None:
    # harmonia's keys, every one of them still known (users switch by package)
    assert set(known_keys()) == {
        "bind", "workers", "max_connection_rate", "max_connections", "priority",
        "virtual_nix_store", "real_nix_store", "enable_compression", "zstd", "sign_key_paths",
        "sign_key_path", "tls_cert_path", "tls_key_path", "nix_db_path", "store_backend",
        "daemon_socket", "nar_source", "state_directory", "compressed_cache_max_bytes",
        "narinfo_cache_entries", "log_level", "push",
    }  # fmt: skip
    assert known_keys()["zstd"] == ("level",)
    assert set(known_keys()["push"]) == {
        "enable", "retention_days", "trusted_keys", "max_nar_bytes", "tokens_file", "idle_timeout",
        "sweep_interval",
    }  # fmt: skip
    # every field is reachable from the file: the struct is its own schema (a table's keys are
    # fields each, like [zstd] level; sign_key_path is an alias)
    assert len(fields(Config)) == sum(len(names) or 1 for names in known_keys().values()) - 1


def test_a_table_given_as_a_value_and_every_problem_keyed() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping({"zstd": 3, "sign_key_path": "", "log_level": "LOUD", "nar_source": 1}, {})
    assert [p.key for p in info.value.problems] == ["zstd", "nar_source", "log_level", "sign_key_path"]
    assert "expected a table like [zstd] level = 3" in str(info.value)
    assert all(isinstance(p, Problem) for p in info.value.problems)


def test_literal_choices_and_case_folding() -> None:
    cfg = config_from_mapping({"log_level": "DEBUG", "store_backend": "daemon"}, {})
    assert (cfg.log_level, cfg.store_backend) == ("debug", "daemon")
    assert get_args(StoreBackend) == ("db", "daemon")
    assert get_args(LogLevel) == ("debug", "info", "warning", "error")


def test_single_key_alias_and_environment_add_up() -> None:
    cfg = config_from_mapping(
        {"sign_key_path": "/a", "sign_key_paths": ["/b"], "virtual_nix_store": "/mnt/store/"},
        {"SIGN_KEY_PATH": "/a /c"},
    )
    assert cfg.sign_key_paths == (Path("/b"), Path("/a"), Path("/c"))
    assert cfg.real_nix_store == cfg.virtual_nix_store == "/mnt/store"
