"""`nix copy --to http://harmonia/push` from another tailnet node, through the sidecar's node
(the tailnet policy passes every method and streams request bodies)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.cache_server import generate_key
from tests.support.nix import build, run
from tests.support.push import closure_expr, untrusting_daemon
from tests.tailnet.netns import Netns, run_in_netns_sync

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("require_real_nodes")]


def test_push_through_the_tailnet_node(
    tailnet_netns: Netns, nix_daemon_env: dict[str, str], tmp_path: Path
) -> None:
    secret, public = generate_key(tmp_path / "keys", "test-pusher-1")
    paths = build(closure_expr("sidecar", 2), nix_daemon_env)
    store = f"local?root={tmp_path / 'pusher-store'}"
    run(["nix", "copy", "--no-check-sigs", "--to", store, *paths], env=nix_daemon_env)
    run(["nix-store", "--delete", *reversed(paths)], env=nix_daemon_env)
    with untrusting_daemon(tmp_path / "daemon", [public]) as daemon:
        try:
            seen = run_in_netns_sync(
                tailnet_netns,
                "tests.e2e.sidecar.push_scenarios:push_through_sidecar",
                {
                    "workdir": str(tmp_path),
                    "host": tailnet_netns.address,
                    "store": store,
                    "paths": paths,
                    "pusher_secret": str(secret),
                    "pusher_public": public,
                    "daemon_socket": str(daemon.socket),
                },
                timeout=280,
            )
            assert seen["wrong_token"]["returncode"] != 0
            assert "401" in seen["wrong_token"]["stderr"]
            assert seen["push"]["returncode"] == 0, seen["push"]["stderr"]
            for path in paths:
                valid = subprocess.run(["nix-store", "--check-validity", path], env=daemon.env, check=False)
                assert valid.returncode == 0, path
            assert not seen["token_logged"]
        finally:
            roots = tmp_path / "cache" / "state" / "push" / "roots"
            pushed = [os.readlink(p) for p in roots.iterdir()] if roots.exists() else []
            shutil.rmtree(roots, ignore_errors=True)
            if pushed:
                subprocess.run(
                    ["nix-store", "--delete", *pushed], env=daemon.env, capture_output=True, check=False
                )
