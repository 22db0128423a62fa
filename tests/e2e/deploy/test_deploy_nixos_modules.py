"""deploy/nixos evaluated with nixpkgs' real module system, where a nixpkgs `lib` is at hand.

nixpkgs is not installed on this kind of machine and the project does not ship it, so this runs
only with `NIXPKGS_LIB=/path/to/nixpkgs/lib` (or a `nixpkgs` on NIX_PATH) and skips otherwise.
eval-modules.nix says what is real (lib.evalModules, our modules) and what is a stand-in (the
NixOS options we write into, two `pkgs` functions): this checks our options, their types and
defaults, assertions and the values the modules produce, not that NixOS builds the system.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.nix import have_nix, nix_env

HERE = Path(__file__).resolve().parent
PK = "harmonia-raider-1:" + "A" * 43 + "="


def find_nixpkgs_lib() -> Path | None:
    candidates = []
    if os.environ.get("NIXPKGS_LIB"):
        candidates.append(Path(os.environ["NIXPKGS_LIB"]))
    if have_nix():
        found = subprocess.run(
            ["nix-instantiate", "--find-file", "nixpkgs"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if found.returncode == 0 and found.stdout.strip():
            candidates.append(Path(found.stdout.strip()) / "lib")
    for lib in candidates:
        if (lib / "default.nix").is_file() and (lib / "modules.nix").is_file():
            return lib
    return None


NIXPKGS_LIB = find_nixpkgs_lib()

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not have_nix(), reason="Nix is not installed"),
    pytest.mark.skipif(
        NIXPKGS_LIB is None,
        reason="no nixpkgs lib here: set NIXPKGS_LIB to a "
        "nixpkgs checkout's lib/ (or put nixpkgs on NIX_PATH) to evaluate the modules",
    ),
]


class EvalError(Exception):
    pass


def evaluate(configuration: str, tmp_path: Path) -> dict[str, Any]:
    expr = (
        f"import {HERE / 'eval-modules.nix'} {{ libPath = {NIXPKGS_LIB}; configuration = {configuration}; }}"
    )
    proc = subprocess.run(
        # read-write: the stand-in package's .drv and the generated settings file are written
        ["nix-instantiate", "--read-write-mode", "--eval", "--strict", "--json", "-E", expr],
        env=nix_env(tmp_path / "xdg"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise EvalError(proc.stderr)
    result = json.loads(proc.stdout)
    assert isinstance(result, dict)
    return result


CACHE_HOST = f"""{{ standInPackage, ... }}: {{
  services.harmonia-bundle.cache = {{
    enable = true;
    package = standInPackage;
    signKeyPaths = [ "/run/agenix/harmonia-raider-1" "/run/agenix/harmonia-raider-2" ];
    pinnedPaths = [ "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello-2.12" ];
    settings = {{ workers = 2; }};
  }};
  services.harmonia-bundle.sidecar = {{
    defaults.authKeyPath = "/run/agenix/tailscale";
    defaults.tags = [ "tag:harmonia" ];
    services.harmonia = {{ upstream = "http://127.0.0.1:5000"; plaintext = true; }};
  }};
  services.harmonia-bundle.gateway = {{
    enable = true; site = "harmonia.example.org"; upstreams = [ "http://harmonia:80" ];
    viaTailnet = "gw"; addToCaddy = true;
  }};
  services.harmonia-bundle.client = {{ enable = true; publicKeys = [ "{PK}" ]; }};
}}"""


def test_cache_host(tmp_path: Path) -> None:
    r = evaluate(CACHE_HOST, tmp_path)
    pkg = r["package"]
    assert r["failedAssertions"] == []
    services = r["services"]
    assert isinstance(services, dict)
    assert set(services) == {"harmonia-dev", "harmonia-healthcheck", "harmonia-sidecar-harmonia"}

    cache = services["harmonia-dev"]
    assert cache["wantedBy"] == ["multi-user.target"]
    assert cache["serviceConfig"]["ExecStart"] == f"{pkg}/bin/harmonia-cache"
    assert cache["serviceConfig"]["Type"] == "notify"
    assert cache["serviceConfig"]["LoadCredential"] == [
        "sign-key-0:/run/agenix/harmonia-raider-1",
        "sign-key-1:/run/agenix/harmonia-raider-2",
    ]
    assert cache["environment"]["SIGN_KEY_PATHS"] == "%d/sign-key-0 %d/sign-key-1"
    assert cache["environment"]["CONFIG_FILE"].endswith("-harmonia.toml")
    assert r["cacheSettings"] == {
        "bind": "[::]:5000",
        "priority": 60,
        "enable_compression": True,
        "store_backend": "daemon",
        "workers": 2,
    }

    health = services["harmonia-healthcheck"]["serviceConfig"]
    assert health["ExecStart"] == f"{pkg}/bin/harmonia-healthcheck http://127.0.0.1:5000/nix-cache-info"
    assert r["timers"] == {
        "harmonia-healthcheck": {
            "description": "Periodic health probe of the Nix binary cache (harmonia-dev)",
            "wantedBy": ["timers.target"],
            "timerConfig": {
                "OnBootSec": "1min",
                "OnUnitActiveSec": "1min",
                "AccuracySec": "5s",
                "Unit": "harmonia-healthcheck.service",
            },
        }
    }

    sidecar = services["harmonia-sidecar-harmonia"]
    assert sidecar["serviceConfig"]["ExecStart"] == (
        f"{pkg}/bin/harmonia-sidecar --name harmonia --tag tag:harmonia "
        "--authkey-path %d/authkey --plaintext http://127.0.0.1:5000"
    )
    assert sidecar["serviceConfig"]["LoadCredential"] == ["authkey:/run/agenix/tailscale"]
    assert sidecar["serviceConfig"]["StateDirectory"] == "harmonia-sidecar/harmonia"
    assert sidecar["environment"]["TS_STATE_DIR"] == "%S/harmonia-sidecar/harmonia"

    assert r["sockets"] == {}
    assert r["firewall"] == []
    assert r["tmpfiles"] == [
        "L+ /nix/var/nix/gcroots/harmonia/0123456789abcdfghijklmnpqrsvwxyz-hello-2.12 - - - - "
        "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello-2.12"
    ]
    assert r["nixSettings"] == {
        "keep-outputs": True,
        "keep-derivations": True,
        "min-free": 10 * 1024**3,
        "max-free": 50 * 1024**3,
        "substituters": ["http://raider:5000?priority=60"],
        "trusted-public-keys": [PK],
    }
    assert r["gatewayScript"] == (
        f"{pkg}/bin/harmonia-caddy gateway --site harmonia.example.org "
        "--upstream http://harmonia:80 --via-tailnet gw > $out\n"
    )
    snippet = r["etc"]["harmonia/gateway.caddy"]
    assert r["caddyExtraConfig"] == f"import {snippet}\n"


def test_socket_activation_and_firewall(tmp_path: Path) -> None:
    r = evaluate(
        """{ standInPackage, ... }: { services.harmonia-bundle.cache = {
      enable = true; package = standInPackage; signKeyPaths = [ "/k" ];
      socketActivation = true; openFirewall = true; port = 5001; address = "::1";
      compression = "none"; priority = 30; storeBackend = "db"; };
      services.harmonia-bundle.healthcheck.enable = false;
      services.harmonia-bundle.retention.enable = false; }""",
        tmp_path,
    )
    assert r["sockets"]["harmonia-dev"]["listenStreams"] == ["[::1]:5001"]
    assert r["firewall"] == [5001]
    assert r["cacheSettings"] == {
        "bind": "[::1]:5001",
        "priority": 30,
        "enable_compression": False,
        "store_backend": "db",
    }
    assert set(r["services"]) == {"harmonia-dev"}
    assert r["timers"] == {}
    assert r["nixSettings"] == {}


def test_a_cache_without_keys_fails_its_assertion(tmp_path: Path) -> None:
    r = evaluate(
        "{ standInPackage, ... }: { services.harmonia-bundle.cache = "
        "{ enable = true; package = standInPackage; }; }",
        tmp_path,
    )
    [message] = r["failedAssertions"]
    assert "signKeyPaths" in message


def test_nothing_enabled_changes_nothing(tmp_path: Path) -> None:
    r = evaluate("{ }", tmp_path)
    assert (r["services"], r["sockets"], r["timers"], r["nixSettings"], r["tmpfiles"]) == ({}, {}, {}, {}, [])


@pytest.mark.parametrize(
    ("cache", "message"),
    [
        ('signKeyPaths = [ "/k" ]; priority = -1;', "services.harmonia-bundle.cache.priority"),
        ('signKeyPaths = [ "/k" ]; compression = "gzip";', "services.harmonia-bundle.cache.compression"),
        # a path literal would copy the secret into the world-readable store: refused
        ("signKeyPaths = [ ./secret ];", "services.harmonia-bundle.cache.signKeyPaths"),
        ('signKeyPaths = [ "/k" ]; pinnedPaths = [ "/etc/passwd" ];', "is not a store path"),
    ],
)
def test_bad_values_are_refused(tmp_path: Path, cache: str, message: str) -> None:
    with pytest.raises(EvalError, match=message.replace(".", r"\.")):
        evaluate(
            "{ standInPackage, ... }: { services.harmonia-bundle.cache = { enable = true; "
            f"package = standInPackage; {cache} }}; }}",
            tmp_path,
        )


PUSHER_KEY = "ci-builders-1:" + "B" * 43 + "="


def test_push_settings_and_the_hosts_trusted_keys(tmp_path: Path) -> None:
    r = evaluate(
        f"""{{ standInPackage, ... }}: {{
  services.harmonia-bundle.cache = {{
    enable = true;
    package = standInPackage;
    signKeyPaths = [ "/run/agenix/harmonia-raider-1" ];
    push = {{ enable = true; trustedKeys = [ "{PUSHER_KEY}" ]; retentionDays = 14; }};
  }};
  services.harmonia-bundle.client = {{ enable = true; publicKeys = [ "{PK}" ]; }};
}}""",
        tmp_path,
    )
    assert r["failedAssertions"] == []
    assert r["cacheSettings"]["push"] == {"enable": True, "trusted_keys": [PUSHER_KEY], "retention_days": 14}
    # the daemon checks the pushers' signatures again when it imports for the cache's user
    assert PUSHER_KEY in r["nixSettings"]["trusted-public-keys"]
    assert PK in r["nixSettings"]["trusted-public-keys"]


def test_push_is_off_by_default(tmp_path: Path) -> None:
    r = evaluate(CACHE_HOST, tmp_path)
    assert "push" not in r["cacheSettings"]
    assert PUSHER_KEY not in r["nixSettings"].get("trusted-public-keys", [])
