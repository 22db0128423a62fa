"""deploy/nixos/: every file parses, and the pure functions of lib.nix evaluate to what we expect.

The real Nix evaluator (`nix-instantiate`) runs the functions; no stand-in `lib` is used because
lib.nix needs only builtins. The modules themselves need nixpkgs' `lib` to evaluate, which is not
available here: they are parsed, not evaluated (see docs/deploy.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cache.config import config_from_mapping, load_config
from deploy import render
from tests.support.nix import have_nix, nix_env

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not have_nix(), reason="nix-instantiate is not installed"),
]

NIXOS = Path(__file__).resolve().parents[3] / "deploy" / "nixos"
LIB = NIXOS / "lib.nix"
PK = "harmonia-raider-1:" + "A" * 43 + "="


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return nix_env(tmp_path / "xdg")


def nix_eval(body: str, env: dict[str, str]) -> object:
    """Evaluate `body` with `l` bound to lib.nix; return the JSON value."""
    expr = f"let l = import {LIB}; in {body}"
    proc = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "-E", expr],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise NixEvalError(proc.stderr)
    return json.loads(proc.stdout)


class NixEvalError(Exception):
    pass


def nix_str(s: str) -> str:
    """A Nix string literal (JSON's escapes are Nix's too, but `${` must be escaped)."""
    return json.dumps(s).replace("${", "\\${")


def test_every_nix_file_parses(env: dict[str, str]) -> None:
    files = sorted(NIXOS.glob("*.nix"))
    assert {f.name for f in files} >= {
        "default.nix",
        "lib.nix",
        "cache.nix",
        "sidecar.nix",
        "gateway.nix",
        "client.nix",
    }
    # and the harness that evaluates the modules where nixpkgs is at hand
    for f in [*files, Path(__file__).with_name("eval-modules.nix")]:
        proc = subprocess.run(
            ["nix-instantiate", "--parse", str(f)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, f"{f.name}: {proc.stderr}"


def test_default_imports_every_module(env: dict[str, str]) -> None:
    imports = nix_eval(f"map toString (import {NIXOS / 'default.nix'}).imports", env)
    assert imports == [str(NIXOS / n) for n in ("cache.nix", "sidecar.nix", "gateway.nix", "client.nix")]


# --- the cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ("{ }", {"bind": "[::]:5000", "priority": 60, "enable_compression": True, "store_backend": "daemon"}),
        (
            '{ address = "127.0.0.1"; port = 5001; storeBackend = "db"; }',
            {"bind": "127.0.0.1:5001", "priority": 60, "enable_compression": True, "store_backend": "db"},
        ),
        (
            '{ address = "::1"; }',
            {"bind": "[::1]:5000", "priority": 60, "enable_compression": True, "store_backend": "daemon"},
        ),
        (
            '{ compression = "none"; zstdLevel = 5; priority = 30; }',
            {"bind": "[::]:5000", "priority": 30, "enable_compression": False, "store_backend": "daemon"},
        ),
        (
            "{ zstdLevel = 5; }",
            {
                "bind": "[::]:5000",
                "priority": 60,
                "enable_compression": True,
                "zstd": {"level": 5},
                "store_backend": "daemon",
            },
        ),
        (
            '{ push = { trustedKeys = [ "ci-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=" ]; maxNarBytes = 1000; }; }',
            {
                "bind": "[::]:5000",
                "priority": 60,
                "enable_compression": True,
                "store_backend": "daemon",
                "push": {
                    "enable": True,
                    "trusted_keys": ["ci-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="],
                    "retention_days": 30,
                    "max_nar_bytes": 1000,
                },
            },
        ),
        (
            '{ extra = { workers = 4; priority = 10; store_backend = "db"; }; }',
            {
                "bind": "[::]:5000",
                "priority": 10,
                "enable_compression": True,
                "workers": 4,
                "store_backend": "db",
            },
        ),
    ],
)
def test_cache_settings(env: dict[str, str], args: str, expected: dict[str, object]) -> None:
    settings = nix_eval(f"l.cacheSettings {args}", env)
    assert settings == expected
    # and the real server's configuration accepts every key we generate
    assert isinstance(settings, dict)
    config = config_from_mapping(settings, {})
    assert config.priority == expected["priority"]
    assert config.enable_compression is expected["enable_compression"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ('{ compression = "gzip"; }', 'compression must be "zstd" or "none"'),
        ("{ port = 0; }", "port must be 1-65535"),
        ("{ port = 70000; }", "port must be 1-65535"),
        ("{ priority = -1; }", "priority must be a non-negative integer"),
        ('{ storeBackend = "sqlite"; }', 'storeBackend must be "daemon" or "db"'),
        ("{ push = { trustedKeys = [ ]; }; }", "push.trustedKeys: list the pushers' public keys"),
    ],
)
def test_cache_settings_errors(env: dict[str, str], args: str, message: str) -> None:
    with pytest.raises(NixEvalError, match=message):
        nix_eval(f"l.cacheSettings {args}", env)


def test_shipped_settings_file_is_what_the_module_generates(env: dict[str, str]) -> None:
    shipped = load_config(render.UNIT_DIR / "harmonia.toml", {})
    settings = nix_eval("l.cacheSettings { }", env)
    assert isinstance(settings, dict)
    generated = config_from_mapping(settings, {})
    assert shipped == generated
    assert str(shipped.bind) == "[::]:5000"
    assert shipped.priority == 60


def test_sign_keys_become_credentials(env: dict[str, str]) -> None:
    result = nix_eval(
        'let c = l.signKeyCredentials [ "/run/agenix/harmonia-raider-1" "/run/agenix/k2" ]; in '
        '{ inherit c; env = l.cacheEnvironment { configFile = "/nix/store/x-harmonia.toml"; '
        'credentials = c; }; unit = (l.cacheServiceConfig { argv = [ "/p/bin/harmonia-cache" ]; '
        "credentials = c; }).LoadCredential; }",
        env,
    )
    assert result == {
        "c": [
            {"name": "sign-key-0", "path": "/run/agenix/harmonia-raider-1"},
            {"name": "sign-key-1", "path": "/run/agenix/k2"},
        ],
        "env": {
            "CONFIG_FILE": "/nix/store/x-harmonia.toml",
            "SIGN_KEY_PATHS": "%d/sign-key-0 %d/sign-key-1",
        },
        "unit": ["sign-key-0:/run/agenix/harmonia-raider-1", "sign-key-1:/run/agenix/k2"],
    }
    with pytest.raises(NixEvalError, match="must be absolute"):
        nix_eval('l.signKeyCredentials [ "relative/key" ]', env)


def test_cache_argv(env: dict[str, str]) -> None:
    assert nix_eval('l.cacheArgv { package = "/nix/store/p"; }', env) == ["/nix/store/p/bin/harmonia-cache"]


# --- systemd command lines ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["/p/bin/harmonia-cache"],
        ["/p/bin/x", "a b", 'q"uote', "back\\slash", "50%", "", "tab\there"],
        ["/p/bin/harmonia-sidecar", "--authkey-path", "%d/authkey", "--name", "harmonia"],
        ["/p/bin/harmonia-sidecar", "--upstream-header", "X-A: b", "http://127.0.0.1:5000"],
    ],
)
def test_exec_line_round_trips(env: dict[str, str], argv: list[str]) -> None:
    """What systemd splits (and expands) from ExecStart= is the argv we asked for."""
    line = nix_eval(f"l.execLine [ {' '.join(nix_str(a) for a in argv)} ]", env)
    assert isinstance(line, str)
    specifiers = {"d": "%d"}  # keep the credentials directory visible in the comparison
    words = render.split_command(line)
    assert [render.expand_specifiers(w, specifiers) for w in words] == argv


@pytest.mark.parametrize("bad", ["[ ]", '[ "relative/bin" ]', "[ 1 ]"])
def test_exec_line_errors(env: dict[str, str], bad: str) -> None:
    with pytest.raises(NixEvalError, match="harmonia-bundle"):
        nix_eval(f"l.execLine {bad}", env)


# --- the shipped units and the module describe the same services -------------------------------

_SKIP = {"ExecStart", "Environment", "LoadCredential"}
# keys whose values are whitespace-separated lists, where one line equals several
_WORD_LISTS = {"ReadOnlyPaths", "RestrictAddressFamilies"}


def _words(key: str, values: list[str]) -> list[str]:
    return [w for v in values for w in v.split()] if key in _WORD_LISTS else values


def _nix_unit(value: object) -> dict[str, list[str]]:
    assert isinstance(value, dict)
    out: dict[str, list[str]] = {}
    for key, v in value.items():
        if key in _SKIP:
            continue
        items = v if isinstance(v, list) else [v]
        out[key] = _words(key, ["yes" if i is True else "no" if i is False else str(i) for i in items])
    return out


def _shipped_unit(name: str, section: str = "Service") -> dict[str, list[str]]:
    sections = render.parse_unit((render.UNIT_DIR / name).read_text())
    out: dict[str, list[str]] = {}
    for key, v in sections[section]:
        if key not in _SKIP:
            out.setdefault(key, []).extend(_words(key, [v]))
    return out


@pytest.mark.parametrize(
    ("unit", "expr"),
    [
        ("harmonia-dev.service", 'l.cacheServiceConfig { argv = [ "/p/bin/harmonia-cache" ]; }'),
        (
            "harmonia-healthcheck.service",
            'l.healthcheckServiceConfig { argv = [ "/p/bin/harmonia-healthcheck" "http://x" ]; }',
        ),
        (
            "harmonia-sidecar@.service",
            'l.sidecarServiceConfig { argv = [ "/p/bin/harmonia-sidecar" ]; '
            'stateDirectory = "harmonia-sidecar/%i"; }',
        ),
    ],
)
def test_module_units_match_the_shipped_units(env: dict[str, str], unit: str, expr: str) -> None:
    assert _nix_unit(nix_eval(expr, env)) == _shipped_unit(unit)


def test_timer_matches_the_shipped_timer(env: dict[str, str]) -> None:
    assert _nix_unit(nix_eval("l.healthcheckTimerConfig { }", env)) == _shipped_unit(
        "harmonia-healthcheck.timer", "Timer"
    )


def test_environments_match_the_shipped_units(env: dict[str, str]) -> None:
    sidecar = render.service_command(
        (render.UNIT_DIR / "harmonia-sidecar@.service").read_text(),
        {"i": "harmonia", "S": "/var/lib", "d": "/run/credentials/x"},
    )
    assert (
        nix_eval('l.sidecarEnvironment { stateDir = "/var/lib/harmonia-sidecar/harmonia"; }', env)
        == sidecar.environment
    )
    cache = render.service_command((render.UNIT_DIR / "harmonia-dev.service").read_text(), {"d": "%d"})
    assert set(cache.environment) == {"CONFIG_FILE", "SIGN_KEY_PATHS"}
    generated = nix_eval(
        'l.cacheEnvironment { configFile = "/x"; credentials = [ { name = "a"; path = "/k"; } ]; }',
        env,
    )
    assert isinstance(generated, dict)
    assert set(generated) == set(cache.environment)


def test_healthcheck(env: dict[str, str]) -> None:
    assert nix_eval("l.healthcheckUrl { }", env) == "http://127.0.0.1:5000/nix-cache-info"
    assert nix_eval(
        'l.healthcheckArgv { package = "/p"; url = l.healthcheckUrl { port = 5001; }; }', env
    ) == ["/p/bin/harmonia-healthcheck", "http://127.0.0.1:5001/nix-cache-info"]
    with pytest.raises(NixEvalError, match="healthcheck url"):
        nix_eval('l.healthcheckArgv { package = "/p"; url = "127.0.0.1:5000"; }', env)


# --- the sidecar: options -> argv --------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        ('{ upstream = "http://127.0.0.1:5000"; }', ["--name", "harmonia", "http://127.0.0.1:5000"]),
        (
            '{ upstream = "http://127.0.0.1:5000"; ephemeral = true; tags = [ "tag:a" "tag:b" ]; '
            'authKeyPath = "%d/authkey"; plaintext = true; listenAddr = ":80"; }',
            [
                "--name",
                "harmonia",
                "--ephemeral",
                "--tag",
                "tag:a",
                "--tag",
                "tag:b",
                "--authkey-path",
                "%d/authkey",
                "--listen-addr",
                ":80",
                "--plaintext",
                "http://127.0.0.1:5000",
            ],
        ),
        (
            '{ upstream = "https://u"; '
            'prefixes = [ "tailnet:/" "/nix-cache-info" ]; stripPrefix = false; '
            'upstreamHeaders = { "X-B" = "2"; "X-A" = "1"; }; insecureHTTPS = true; '
            'whoisTimeout = "500ms"; suppressWhois = true; readHeaderTimeout = 5; timeout = 60; '
            'prometheusAddr = ":9099"; upstreamUnixAddr = "/run/u.sock"; extraArgs = [ "--x" ]; }',
            [
                "--name",
                "harmonia",
                "--prefix",
                "tailnet:/",
                "--prefix",
                "/nix-cache-info",
                "--no-strip-prefix",
                "--upstream-header",
                "X-A: 1",
                "--upstream-header",
                "X-B: 2",
                "--insecure-https",
                "--whois-timeout",
                "500ms",
                "--suppress-whois",
                "--read-header-timeout",
                "5s",
                "--timeout",
                "60s",
                "--prometheus-addr",
                ":9099",
                "--upstream-unix-addr",
                "/run/u.sock",
                "--x",
                "https://u",
            ],
        ),
        (
            '{ upstream = "http://u"; certificateFile = "/c.pem"; keyFile = "/k.pem"; }',
            ["--name", "harmonia", "--certificate-file", "/c.pem", "--key-file", "/k.pem", "http://u"],
        ),
    ],
)
def test_sidecar_argv(env: dict[str, str], service: str, expected: list[str]) -> None:
    argv = nix_eval(f'l.sidecarArgv {{ package = "/p"; name = "harmonia"; service = {service}; }}', env)
    assert argv == ["/p/bin/harmonia-sidecar", *expected]


@pytest.mark.parametrize(
    ("name", "service", "message"),
    [
        ("Harmonia", '{ upstream = "http://u"; }', "is not a tailnet host name"),
        ("-x", '{ upstream = "http://u"; }', "is not a tailnet host name"),
        ("harmonia", "{ }", "upstream is required"),
        ("harmonia", '{ upstream = "http://u"; funnel = true; }', "Funnel is not available"),
        ("harmonia", '{ upstream = "http://u"; tags = [ "server" ]; }', "tags must look like"),
        ("harmonia", '{ upstream = "http://u"; keyFile = "/k"; }', "go together"),
        ("harmonia", '{ upstream = "http://u"; timeout = 1.5; }', "durations are integers"),
    ],
)
def test_sidecar_argv_errors(env: dict[str, str], name: str, service: str, message: str) -> None:
    with pytest.raises(NixEvalError, match=message):
        nix_eval(f'l.sidecarArgv {{ package = "/p"; name = "{name}"; service = {service}; }}', env)


# --- gateway, clients, retention, pins -----------------------------------------------------------


def test_gateway_argv(env: dict[str, str]) -> None:
    assert nix_eval(
        'l.gatewayArgv { package = "/p"; site = "cache.example.org"; '
        'upstreams = [ "http://harmonia:80" "http://100.64.0.5:5000" ]; tls = "internal"; }',
        env,
    ) == [
        "/p/bin/harmonia-caddy",
        "gateway",
        "--site",
        "cache.example.org",
        "--upstream",
        "http://harmonia:80",
        "--upstream",
        "http://100.64.0.5:5000",
        "--tls",
        "internal",
    ]
    assert nix_eval(
        'l.gatewayArgv { package = "/p"; site = "c.example.org"; upstreams = [ "http://h:80" ]; '
        'viaTailnet = "gw"; expose = [ "log" "metrics" ]; maxBody = "none"; allowUpload = true; '
        'bind = [ "10.0.0.1" ]; snippetName = "s"; logOutput = "stdout"; accessLog = false; '
        "compress = false; }",
        env,
    ) == [
        "/p/bin/harmonia-caddy",
        "gateway",
        "--site",
        "c.example.org",
        "--upstream",
        "http://h:80",
        "--via-tailnet",
        "gw",
        "--expose",
        "log",
        "--expose",
        "metrics",
        "--max-body",
        "none",
        "--allow-upload",
        "--bind",
        "10.0.0.1",
        "--snippet-name",
        "s",
        "--log-output",
        "stdout",
        "--no-access-log",
        "--no-compress",
    ]
    with pytest.raises(NixEvalError, match="at least one upstream"):
        nix_eval('l.gatewayArgv { package = "/p"; site = "c"; upstreams = [ ]; }', env)
    with pytest.raises(NixEvalError, match="expose takes"):
        nix_eval(
            'l.gatewayArgv { package = "/p"; site = "c"; upstreams = [ "http://h" ]; expose = [ "all" ]; }',
            env,
        )


def test_client_settings(env: dict[str, str]) -> None:
    assert nix_eval(f'l.clientSettings {{ url = "http://raider:5000"; publicKeys = [ "{PK}" ]; }}', env) == {
        "substituters": ["http://raider:5000?priority=60"],
        "trusted-public-keys": [PK],
    }
    assert nix_eval(
        f'l.clientSettings {{ url = "https://c.example.org"; priority = null; publicKeys = [ "{PK}" ]; }}',
        env,
    ) == {"substituters": ["https://c.example.org"], "trusted-public-keys": [PK]}
    for bad in (
        'url = "raider:5000"; publicKeys = [ "' + PK + '" ];',
        'url = "http://raider:5000?x=1"; publicKeys = [ "' + PK + '" ];',
        'url = "http://raider:5000"; publicKeys = [ ];',
        'url = "http://raider:5000"; publicKeys = [ "harmonia-raider-1" ];',
    ):
        with pytest.raises(NixEvalError, match="client"):
            nix_eval(f"l.clientSettings {{ {bad} }}", env)


def test_retention_settings(env: dict[str, str]) -> None:
    assert nix_eval("l.retentionSettings { }", env) == {"keep-outputs": True, "keep-derivations": True}
    assert nix_eval("l.retentionSettings { keepOutputs = false; minFree = 1; maxFree = 2; }", env) == {
        "keep-outputs": False,
        "keep-derivations": True,
        "min-free": 1,
        "max-free": 2,
    }
    with pytest.raises(NixEvalError, match="minFree must be below maxFree"):
        nix_eval("l.retentionSettings { minFree = 2; maxFree = 1; }", env)


def test_pin_rules_make_the_roots_harmonia_cache_pin_makes(env: dict[str, str]) -> None:
    from cache.gcroots import parse_store_path, root_name

    path = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello-2.12"
    assert nix_eval(f'l.pinRules {{ paths = [ "{path}" ]; }}', env) == [
        f"L+ /nix/var/nix/gcroots/harmonia/{root_name(parse_store_path(path))} - - - - {path}"
    ]
    for bad in (
        "/nix/store/x",
        "/etc/passwd",
        "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-.a",
        "/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-a",
    ):
        with pytest.raises(NixEvalError, match="is not a store path"):
            nix_eval(f'l.pinRules {{ paths = [ "{bad}" ]; }}', env)


# --- what lib.nix produces, the real programs accept ---------------------------------------------

VENV = Path(sys.executable).parent.parent  # lib.nix builds "${package}/bin/<program>"


def test_real_sidecar_accepts_the_module_argv(env: dict[str, str], tmp_path: Path) -> None:
    services = [
        '{ upstream = "http://127.0.0.1:5000"; plaintext = true; tags = [ "tag:harmonia" ]; }',
        '{ upstream = "https://u.example"; ephemeral = true; '
        'prefixes = [ "tailnet:/" "/nix-cache-info" ]; stripPrefix = false; '
        'upstreamHeaders = { "X-A" = "1"; }; insecureHTTPS = true; whoisTimeout = "500ms"; '
        'suppressWhois = true; readHeaderTimeout = 5; timeout = 60; listenAddr = ":8443"; '
        'authKeyPath = "%d/authkey"; }',
    ]
    for service in services:
        argv = nix_eval(
            f'l.sidecarArgv {{ package = "{VENV}"; name = "harmonia"; service = {service}; }}', env
        )
        assert isinstance(argv, list)
        argv = [a.replace("%d", str(tmp_path)) for a in argv]
        proc = subprocess.run(
            [*argv, "--print-engine-config"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=dict(env, TS_STATE_DIR=str(tmp_path / "state")),
        )
        assert proc.returncode == 0, f"{argv}: {proc.stderr}"
        nodes = json.loads(proc.stdout)["apps"]["tailscale"]["nodes"]
        assert list(nodes) == ["harmonia"]


def test_real_gateway_renders_the_module_argv(env: dict[str, str]) -> None:
    argv = nix_eval(
        f'l.gatewayArgv {{ package = "{VENV}"; site = "cache.example.org"; '
        'upstreams = [ "http://harmonia:80" ]; viaTailnet = "gw"; snippetName = "hx_gateway"; '
        'tls = "internal"; expose = [ "metrics" ]; }',
        env,
    )
    assert isinstance(argv, list)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "(hx_gateway) {" in proc.stdout
    assert "cache.example.org" in proc.stdout


def test_client_settings_match_harmonia_caddy_client(env: dict[str, str]) -> None:
    """The module's nix.settings equal the fleet's rendering by `harmonia-caddy client`."""
    ours = nix_eval(f'l.clientSettings {{ url = "http://raider:5000"; publicKeys = [ "{PK}" ]; }}', env)
    proc = subprocess.run(
        [
            str(VENV / "bin/harmonia-caddy"),
            "client",
            "--substituter",
            "http://raider:5000",
            "--public-key",
            PK,
            "--no-cache-nixos-org",
            "--format",
            "nix.conf",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    conf = dict(
        line.split(" = ", 1)
        for line in proc.stdout.splitlines()
        if " = " in line and not line.startswith("#")
    )
    assert ours == {k: conf[k].split() for k in ("substituters", "trusted-public-keys")}


def test_sidecar_argv_push_allow(env: dict[str, str]) -> None:
    service = '{ upstream = "http://u"; pushAllow = [ "tag:ci" "alice@example.com" ]; }'
    argv = nix_eval(f'l.sidecarArgv {{ package = "/p"; name = "harmonia"; service = {service}; }}', env)
    assert argv[3:] == ["--push-allow", "tag:ci", "--push-allow", "alice@example.com", "http://u"]


def test_gateway_argv_expose_push(env: dict[str, str]) -> None:
    argv = nix_eval(
        'l.gatewayArgv { package = "/p"; site = "c.example.org"; upstreams = [ "http://h:80" ]; '
        'expose = [ "push" ]; maxPushBody = "8GiB"; }',
        env,
    )
    assert argv[6:] == ["--expose", "push", "--max-push-body", "8GiB"]
