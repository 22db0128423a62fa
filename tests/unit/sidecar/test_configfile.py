"""The many-services config file (TOML): layout, defaults, and every problem at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.problems import ConfigError
from sidecar.cli import load
from sidecar.model import validate
from sidecar.spec import parse_duration, spec_from_toml

GOOD = """
state_dir = "/var/lib/harmonia-sidecar"
prometheus_addr = ":9099"

[defaults]
tags = ["tag:server"]
plaintext = true

[services.harmonia]
upstream = "http://127.0.0.1:5000"
prefix = ["/nix-cache-info", "tailnet:/nar/"]
timeout = "2m"

[services.echo]
upstream = "http://127.0.0.1:9000"
tags = ["tag:echo"]
suppress_whois = true
state_dir = "/srv/echo-node"
policy = { response_header_timeout_s = 30.0 }
"""


def test_layout_and_defaults() -> None:
    cfg = validate(spec_from_toml(GOOD), {})
    harmonia, echo = cfg.services
    assert (harmonia.name, echo.name) == ("harmonia", "echo")
    assert harmonia.tags == ("tag:server",)  # from [defaults]
    assert echo.tags == ("tag:echo",)  # a service's own value wins
    assert harmonia.listen.port == echo.listen.port == 80
    assert harmonia.node_dir == "/var/lib/harmonia-sidecar/harmonia"
    assert echo.node_dir == "/srv/echo-node"
    assert harmonia.startup_timeout == 120
    assert [str(p) for p in harmonia.prefixes] == ["/nix-cache-info", "tailnet:/nar/"]
    assert not echo.whois
    assert echo.policy.response_header_timeout_s == 30.0
    assert harmonia.policy.response_header_timeout_s == 120.0  # the shared tailnet policy's
    assert cfg.prometheus_addr == ("127.0.0.1", 9099)


def test_every_problem_named_by_key() -> None:
    text = """
colour = "blue"
tsnet_verbose = "yes"
[services.ok]
upstream = "http://127.0.0.1:1"
[services.bad]
upstream = 5000
tag = "tag:x"
plaintext = "true"
timeout = "forever"
frobnicate = 1
policy = { dial_timeout_s = -1, nonsense = true }
[services.Bad_Name]
upstream = "http://127.0.0.1:2"
"""
    with pytest.raises(ConfigError) as info:
        validate(spec_from_toml(text), {"HOME": "/h"})
    keys = {p.key for p in info.value.problems}
    assert {
        "colour",
        "tsnet_verbose",
        "bad.upstream",
        "bad.tag",
        "bad.plaintext",
        "bad.timeout",
        "bad.frobnicate",
        "bad.policy.dial_timeout_s",
        "bad.policy.nonsense",
        "Bad_Name.name",
    } <= keys
    assert not any(k.startswith("ok.") for k in keys)


def test_not_toml() -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        validate(spec_from_toml("[services.x\n", origin="sidecar.toml"), {})


def test_config_flag_reads_the_file_and_resolves_paths(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_text(
        'state_dir = "state"\n[services.a]\nupstream = "http://127.0.0.1:1"\nauthkey_path = "keys/a"\n'
    )
    cfg, _ = load(["--config", str(path)], {})
    assert cfg.state_root == str(tmp_path / "state")
    assert cfg.services[0].auth.path == str(tmp_path / "keys/a")
    # the command line may set the sidecar-wide options, never a service's
    cfg, _ = load(["--config", str(path), "--state-root", "/elsewhere"], {})
    assert cfg.state_root == "/elsewhere"
    with pytest.raises(ConfigError) as info:
        load(["--config", str(path), "--name", "x", "--plaintext"], {})
    assert {p.key for p in info.value.problems} == {"--name", "--plaintext"}


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(["--config", "/nonexistent/sidecar.toml"], {})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("1m", 60.0),
        ("1m30s", 90.0),
        ("500ms", 0.5),
        ("2h", 7200.0),
        ("1.5", 1.5),
        ("250us", 0.00025),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1x", "m", "1s2", "-"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)
