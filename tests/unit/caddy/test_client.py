"""caddy.client: nix.conf lines and the NixOS snippet for a client host."""

from __future__ import annotations

import base64

import pytest

from caddy.client import (
    CACHE_NIXOS_ORG,
    CACHE_NIXOS_ORG_KEY,
    ClientSettings,
    default_substituters,
    normalize_public_key,
    render_nix_conf,
    render_nixos,
)
from common.problems import ConfigError

KEY_B64 = base64.b64encode(bytes(range(32))).decode()
KEY = f"harmonia-raider-1:{KEY_B64}"


def test_fleet_defaults() -> None:
    assert default_substituters("tail1234") == (
        "https://harmonia.arsfeld.one",
        "https://harmonia.tail1234.ts.net",
    )
    with pytest.raises(ConfigError, match="tailnet"):
        default_substituters("bad name")


def test_public_keys() -> None:
    assert normalize_public_key(KEY) == KEY
    assert normalize_public_key(f"  {KEY}\n") == KEY
    assert normalize_public_key(KEY_B64) == KEY  # a bare key gets the fleet's key name
    assert normalize_public_key(KEY_B64, "other-1") == f"other-1:{KEY_B64}"
    with pytest.raises(ConfigError, match="32 bytes"):
        normalize_public_key("harmonia-raider-1:AAAA")
    with pytest.raises(ConfigError, match="key name"):
        normalize_public_key(f"bad name:{KEY_B64}")


def test_a_secret_key_is_refused_and_not_echoed() -> None:
    secret = base64.b64encode(bytes(range(64))).decode()
    with pytest.raises(ConfigError) as caught:
        normalize_public_key(f"harmonia-raider-1:{secret}")
    assert "SECRET" in str(caught.value)
    assert secret not in str(caught.value)


def test_settings_render_both_frontends_then_cache_nixos_org() -> None:
    settings = ClientSettings(default_substituters("tail1234"), (KEY,))
    conf = render_nix_conf(settings)
    assert conf == (
        "substituters = https://harmonia.arsfeld.one?priority=60 "
        f"https://harmonia.tail1234.ts.net?priority=60 {CACHE_NIXOS_ORG}\n"
        f"trusted-public-keys = {KEY} {CACHE_NIXOS_ORG_KEY}\n"
    )
    nixos = render_nixos(settings)
    assert nixos.index("harmonia.arsfeld.one") < nixos.index("ts.net") < nixos.index(CACHE_NIXOS_ORG)
    assert f'"{KEY}"' in nixos and f'"{CACHE_NIXOS_ORG_KEY}"' in nixos
    assert nixos.count("{") == nixos.count("}")


def test_settings_options() -> None:
    settings = ClientSettings(
        ("https://cache.example/",), (KEY, KEY), priority=None, include_cache_nixos_org=False
    )
    assert render_nix_conf(settings) == (
        "substituters = https://cache.example\ntrusted-public-keys = " + KEY + "\n"
    )


def test_bad_settings_list_every_problem() -> None:
    with pytest.raises(ConfigError) as caught:
        ClientSettings(("ftp://x", "https://a b", "https://u:pw@host"), ("nope",), priority=-1)
    problems = caught.value.problems
    assert [p.key for p in problems] == [
        "substituters[0]",
        "substituters[1]",
        "substituters[2]",
        "public_keys[0]",
        "priority",
    ]
    assert "pw@" not in str(caught.value)
    with pytest.raises(ConfigError, match="at least one"):
        ClientSettings((), ())
