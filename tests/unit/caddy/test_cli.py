"""harmonia-caddy: the command line over the renderers (output, flags, error reporting)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from caddy.caddyfile import render_gateway
from caddy.cli import main, parse_size
from caddy.model import GatewaySite, Upstream
from caddy.policy import Policy

KEY_B64 = base64.b64encode(bytes(range(32))).decode()


def test_gateway_prints_the_rendered_snippet(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "gateway",
                "--site",
                "harmonia.arsfeld.one",
                "--upstream",
                "https://harmonia.tail1234.ts.net",
                "--upstream",
                "http://100.64.0.5:5000",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    expected = render_gateway(
        GatewaySite(
            "harmonia.arsfeld.one",
            (Upstream("https://harmonia.tail1234.ts.net"), Upstream("http://100.64.0.5:5000")),
        )
    )
    assert out == expected
    assert out.endswith("}\n") and not out.endswith("\n\n")  # as `caddy fmt` wants it


def test_gateway_flags_map_onto_the_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "gateway",
                "--site",
                "https://127.0.0.1:8443",
                "--upstream",
                "127.0.0.1:5000",
                "--expose",
                "metrics",
                "--expose",
                "serve",
                "--max-body",
                "64K",
                "--allow-upload",
                "--tls",
                "internal",
                "--bind",
                "127.0.0.1",
                "--snippet-name",
                "cache",
                "--log-output",
                "stdout",
                "--no-compress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    expected = render_gateway(
        GatewaySite(
            "https://127.0.0.1:8443",
            (Upstream("127.0.0.1:5000"),),
            policy=Policy(
                expose_metrics=True,
                expose_serve=True,
                max_request_body_bytes=65536,
                allow_upload=True,
                compress_small_text=False,
            ),
            snippet_name="cache",
            tls="internal",
            bind=("127.0.0.1",),
            log_output="stdout",
        )
    )
    assert out == expected


def test_gateway_via_tailnet(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "gateway",
                "--site",
                "harmonia.arsfeld.one",
                "--upstream",
                "https://harmonia.tail1234.ts.net",
                "--via-tailnet",
                "gateway",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "transport tailscale gateway" in captured.out
    assert "dial_timeout" not in captured.out
    # the tailnet transport cannot probe an https upstream over TLS: active checks off, said once
    assert "health_uri" not in captured.out
    assert "fail_duration" in captured.out
    assert "active health checks are off" in captured.err


def test_gateway_via_tailnet_to_plain_http_keeps_active_checks(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["gateway", "--site", "a.example", "--upstream", "http://harmonia", "--via-tailnet", "gw"]) == 0
    )
    captured = capsys.readouterr()
    assert "health_uri" in captured.out
    assert captured.err == ""


def test_gateway_without_active_health_checks(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "gateway",
                "--site",
                "harmonia.arsfeld.one",
                "--upstream",
                "http://harmonia",
                "--via-tailnet",
                "harmonia-gateway",
                "--no-active-health-checks",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out == render_gateway(
        GatewaySite(
            "harmonia.arsfeld.one",
            (Upstream("http://harmonia", "harmonia-gateway"),),
            policy=Policy(active_health_checks=False),
        )
    )
    assert "health_uri" not in out
    assert "fail_duration" in out


def test_gateway_reports_every_problem_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "gateway",
                "--site",
                "a b",
                "--upstream",
                "ftp://x",
                "--upstream",
                "http://h:0",
                "--max-body",
                "12Q",
                "--via-tailnet",
                "bad node",
                "--tls",
                "maybe",
                "--log-output",
                "rel.log",
            ]
        )
        == 2
    )
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert "7 problems" in err
    for flag in (
        "--via-tailnet:",
        "--upstream[0]",
        "--upstream[1]",
        "--max-body:",
        "--site:",
        "--tls:",
        "--log-output:",
    ):
        assert flag in err, flag


def test_client_with_fleet_defaults(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    key_file = tmp_path / "public.key"
    key_file.write_text(f"harmonia-raider-1:{KEY_B64}\n")
    assert main(["client", "--tailnet", "tail1234", "--public-key-file", str(key_file)]) == 0
    out = capsys.readouterr().out
    assert (
        "substituters = https://harmonia.arsfeld.one?priority=60 "
        "https://harmonia.tail1234.ts.net?priority=60 https://cache.nixos.org\n" in out
    )
    assert f"harmonia-raider-1:{KEY_B64}" in out
    assert "nix.settings = {" in out


def test_client_formats_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "client",
                "--substituter",
                "https://cache.example",
                "--public-key",
                KEY_B64,
                "--key-name",
                "example-1",
                "--priority",
                "30",
                "--no-cache-nixos-org",
                "--format",
                "nix.conf",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == (
        f"substituters = https://cache.example?priority=30\ntrusted-public-keys = example-1:{KEY_B64}\n"
    )
    assert main(["client", "--tailnet", "t1", "--public-key", KEY_B64, "--format", "nixos"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("{\n  nix.settings")


def test_client_reports_every_problem(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    secret = base64.b64encode(bytes(64)).decode()
    assert (
        main(["client", "--public-key", f"k:{secret}", "--public-key-file", str(tmp_path / "missing")]) == 2
    )
    err = capsys.readouterr().err
    assert "--tailnet:" in err
    assert "--public-key #1" in err and "SECRET" in err and secret not in err
    assert "cannot read" in err
    assert main(["client", "--tailnet", "t1"]) == 2
    assert "--public-key:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", 1048576),
        ("64K", 65536),
        ("1MiB", 1048576),
        ("2G", 2 * 1024**3),
        ("none", None),
        ("512B", 512),
    ],
)
def test_parse_size(text: str, size: int | None) -> None:
    assert parse_size(text) == size


def test_parse_size_refuses_junk() -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")
