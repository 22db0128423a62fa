"""Done-criterion of the sidecar: the cache published on the tailnet in one command, and the real
Nix client on another node copying a closure with a ~200 MB path through it, signatures required.
Runs inside a throwaway network namespace (tests/e2e/sidecar/scenarios.py: ``nix_copy``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fixtures import Fixtures
from tests.support.nix import run
from tests.tailnet.netns import Netns, run_in_netns_sync

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("require_real_nodes")]


def test_nix_copy_through_the_published_cache(
    tailnet_netns: Netns, store_fixtures: Fixtures, nix_daemon_env: dict[str, str], tmp_path: Path
) -> None:
    closure = [store_fixtures.tree, store_fixtures.dep, store_fixtures.big]
    for i, path in enumerate(closure):  # GC roots: other tests may collect garbage meanwhile
        run(
            ["nix-store", "--add-root", str(tmp_path / f"gcroot-{i}"), "--indirect", "--realise", path],
            env=nix_daemon_env,
            timeout=120,
        )
    seen = run_in_netns_sync(
        tailnet_netns,
        "tests.e2e.sidecar.scenarios:nix_copy",
        {
            "workdir": str(tmp_path),
            "host": tailnet_netns.address,
            "paths": [store_fixtures.tree, store_fixtures.big],
            "closure": closure,
        },
        timeout=280,
    )
    assert "Priority: 60" in seen["cache_info"]
    assert seen["copy_returncode"] == 0, seen["copy_stderr"]
    for path in closure:
        assert seen["copied"][path]["same_hash"], path
        assert seen["copied"][path]["signed"], path
    assert seen["copied"][store_fixtures.big]["size"] > 190_000_000
