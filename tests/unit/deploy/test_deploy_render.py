"""deploy.render: reading units, specifiers, ExecStart, Environment, prefix; the shipped units."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from deploy import render
from deploy.render import UnitError


def test_parse_unit_sections_repeats_continuations_comments() -> None:
    text = (
        "# comment\n; other comment\n[Unit]\nDescription=x y\n\n[Service]\n"
        "Environment=A=1\nEnvironment=B=2 \\\n  C=3\nExecStart=/bin/x\n"
    )
    sections = render.parse_unit(text)
    assert sections == {
        "Unit": [("Description", "x y")],
        "Service": [("Environment", "A=1"), ("Environment", "B=2  C=3"), ("ExecStart", "/bin/x")],
    }
    assert render.values(sections, "Service", "Environment") == ["A=1", "B=2  C=3"]
    assert render.value(sections, "Unit", "Description") == "x y"
    assert render.value(sections, "Unit", "Absent") is None


def test_empty_assignment_resets_a_list() -> None:
    sections = render.parse_unit("[Service]\nEnvironment=A=1\nEnvironment=\nEnvironment=B=2\n")
    assert render.values(sections, "Service", "Environment") == ["B=2"]


@pytest.mark.parametrize("text", ["Key=value\n", "[Service]\nno equals sign\n", "[Service]\nA=b \\\n"])
def test_parse_unit_rejects(text: str) -> None:
    with pytest.raises(UnitError):
        render.parse_unit(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("%d/harmonia-raider-1", "/run/credentials/u/harmonia-raider-1"),
        ("%S/harmonia-sidecar/%i", "/var/lib/harmonia-sidecar/web"),
        ("100%%", "100%"),
        ("%%d", "%d"),
        ("plain", "plain"),
    ],
)
def test_expand_specifiers(text: str, expected: str) -> None:
    specs = {"d": "/run/credentials/u", "S": "/var/lib", "i": "web"}
    assert render.expand_specifiers(text, specs) == expected


@pytest.mark.parametrize("text", ["%q", "x%"])
def test_expand_specifiers_rejects(text: str) -> None:
    with pytest.raises(UnitError):
        render.expand_specifiers(text, {})


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        ("/usr/bin/harmonia-cache", ["/usr/bin/harmonia-cache"]),
        ('-/bin/x "a b" c', ["/bin/x", "a b", "c"]),
        ("@+/bin/x 'a \"b'", ["/bin/x", 'a "b']),
    ],
)
def test_split_command(command: str, argv: list[str]) -> None:
    assert render.split_command(command) == argv


@pytest.mark.parametrize("command", ["", "x y", '/bin/x "unterminated'])
def test_split_command_rejects(command: str) -> None:
    with pytest.raises(UnitError):
        render.split_command(command)


def test_parse_environment() -> None:
    assert render.parse_environment(["A=1", 'B="two words" C=', "A=3"]) == {
        "A": "3",
        "B": "two words",
        "C": "",
    }
    with pytest.raises(UnitError, match="not VAR=value"):
        render.parse_environment(["NOEQUALS"])
    with pytest.raises(UnitError, match="not VAR=value"):
        render.parse_environment(["1A=x"])


def test_with_prefix_rewrites_only_our_programs_in_exec_lines() -> None:
    text = (
        "[Service]\nExecStart=/usr/bin/harmonia-cache --x /usr/bin/harmonia-cache\n"
        "ExecStartPre=-/usr/bin/harmonia-healthcheck\nExecStop=/usr/bin/kill\n"
        "Environment=P=/usr/bin/harmonia-cache\nExecStart=/usr/bin/harmonia-cachex\n"
    )
    assert render.with_prefix(text, "/opt/h/bin/") == (
        "[Service]\nExecStart=/opt/h/bin/harmonia-cache --x /usr/bin/harmonia-cache\n"
        "ExecStartPre=-/opt/h/bin/harmonia-healthcheck\nExecStop=/usr/bin/kill\n"
        "Environment=P=/usr/bin/harmonia-cache\nExecStart=/usr/bin/harmonia-cachex\n"
    )


@pytest.mark.parametrize("prefix", ["relative/bin", "/with space", "/per%cent"])
def test_with_prefix_rejects(prefix: str) -> None:
    with pytest.raises(UnitError):
        render.with_prefix("[Service]\n", prefix)


def test_render_units_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert render.main(["--prefix", "/opt/harmonia/bin", "--dest", str(tmp_path)]) == 0
    written = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in written) == [
        "harmonia-dev.service",
        "harmonia-dev.socket",
        "harmonia-healthcheck.service",
        "harmonia-healthcheck.timer",
        "harmonia-sidecar@.service",
    ]
    text = (tmp_path / "harmonia-dev.service").read_text()
    assert "ExecStart=/opt/harmonia/bin/harmonia-cache\n" in text
    assert "/usr/bin/harmonia" not in "".join((tmp_path / Path(p).name).read_text() for p in written)


# --- what the shipped units promise --------------------------------------------------------------


def _unit(name: str) -> render.Sections:
    return render.parse_unit((render.UNIT_DIR / name).read_text())


def test_cache_unit() -> None:
    u = _unit("harmonia-dev.service")
    svc = {k: render.value(u, "Service", k) for k, _ in u["Service"]}
    assert svc["Type"] == "notify"
    assert svc["StateDirectory"] == "harmonia"
    assert svc["Restart"] == "on-failure"
    assert svc["WatchdogSec"] == "30s"
    for key, expected in [
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("DynamicUser", "yes"),
    ]:
        assert svc[key] == expected, key
    assert set(str(svc["RestrictAddressFamilies"]).split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    cmd = render.service_command(
        (render.UNIT_DIR / "harmonia-dev.service").read_text(), {"d": "/run/credentials/h", "S": "/var/lib"}
    )
    assert cmd.argv == ["/usr/bin/harmonia-cache"]
    assert cmd.environment == {
        "CONFIG_FILE": "/etc/harmonia/harmonia.toml",
        "SIGN_KEY_PATHS": "/run/credentials/h/harmonia-raider-1",
    }
    # every key file named in SIGN_KEY_PATHS is a credential the unit loads
    credentials = {c.split(":", 1)[0] for c in render.values(u, "Service", "LoadCredential")}
    names = {p.rsplit("/", 1)[1] for p in cmd.environment["SIGN_KEY_PATHS"].split()}
    assert names == credentials == {"harmonia-raider-1"}


def test_socket_unit_activates_the_cache_on_its_port() -> None:
    u = _unit("harmonia-dev.socket")
    assert render.value(u, "Socket", "ListenStream") == "[::]:5000"
    assert render.value(u, "Socket", "Service") == "harmonia-dev.service"


def test_healthcheck_units() -> None:
    cmd = render.service_command((render.UNIT_DIR / "harmonia-healthcheck.service").read_text(), {})
    assert cmd.argv == ["/usr/bin/harmonia-healthcheck", "http://127.0.0.1:5000/nix-cache-info"]
    t = _unit("harmonia-healthcheck.timer")
    assert render.value(t, "Timer", "Unit") == "harmonia-healthcheck.service"
    assert render.value(t, "Install", "WantedBy") == "timers.target"


def test_sidecar_unit_is_per_instance() -> None:
    text = (render.UNIT_DIR / "harmonia-sidecar@.service").read_text()
    credentials = "/run/credentials/harmonia-sidecar@harmonia.service"
    cmd = render.service_command(text, {"i": "harmonia", "S": "/var/lib", "d": credentials})
    assert cmd.argv == ["/usr/bin/harmonia-sidecar", "--config", "/etc/harmonia-sidecar/harmonia.toml"]
    assert cmd.environment["TS_STATE_DIR"] == "/var/lib/harmonia-sidecar/harmonia"
    u = render.parse_unit(text)
    assert render.value(u, "Service", "StateDirectory") == "harmonia-sidecar/%i"
    assert render.values(u, "Service", "LoadCredential") == ["authkey:/etc/harmonia-sidecar/%i.authkey"]
    # the example configuration names no key file: the sidecar reads $CREDENTIALS_DIRECTORY/authkey,
    # where LoadCredential=authkey:… puts it
    example = tomllib.loads((render.UNIT_DIR / "harmonia-sidecar.example.toml").read_text())
    assert "authkey_path" not in example["defaults"]
    assert list(example["services"]) == ["harmonia"]


def test_sidecar_stop_timeout_covers_the_engines_kill_deadline() -> None:
    # issue 15: a stop ends within the engine's grace (Caddy is killed after it); the unit must
    # not SIGKILL the sidecar first, or Caddy could outlive it holding the nodes' state
    from sidecar.engine import ENGINE_STOP_GRACE

    timeout = str(render.value(_unit("harmonia-sidecar@.service"), "Service", "TimeoutStopSec"))
    assert timeout.endswith("s")
    assert float(timeout[:-1]) >= 2 * ENGINE_STOP_GRACE
    nix = (render.UNIT_DIR.parent / "nixos" / "lib.nix").read_text()
    assert nix.count('TimeoutStopSec = "30s";') == 2  # cache and sidecar, the same as the units
