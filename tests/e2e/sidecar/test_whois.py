"""The whois directory end to end: real ``harmonia-sidecar`` with API credentials (the local
tailnet's OAuth client), real arkitekt-mesh nodes calling it inside a throwaway network namespace
(tests/e2e/sidecar/scenarios.py: ``whois_directory``)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.tailnet.netns import Netns, run_in_netns_sync

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("require_real_nodes")]


@pytest.fixture(scope="module")
def seen(netns_module: Netns, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("sidecar-whois")
    result: dict[str, Any] = run_in_netns_sync(
        netns_module,
        "tests.e2e.sidecar.scenarios:whois_directory",
        {"workdir": str(workdir), "host": netns_module.address},
        timeout=120,
    )
    return result


def test_a_tagged_node_is_named_with_its_tags(seen: dict[str, Any]) -> None:
    builder = seen["builder"]
    assert builder["status"] == 200
    headers = builder["headers"]
    node = builder["node"]
    assert node["tags"] == ["tag:server"]
    assert headers["x-tailscale-node-name"] == "builder"
    assert headers["x-tailscale-node-tags"] == "tag:server"
    assert headers["x-tailscale-node"] == str(node["id"])
    assert headers["x-tailscale-node-stableid"] == f"n{node['id']:x}CNTRL"
    assert headers["x-tailscale-node-addr"] == builder["addresses"][0]
    assert not [h for h in headers if h.startswith(("x-tailscale-user", "tailscale-user"))]


def test_a_users_node_is_named_too(seen: dict[str, Any]) -> None:
    laptop = seen["laptop"]
    assert laptop["status"] == 200
    headers = laptop["headers"]
    assert headers["x-tailscale-user-loginname"] == "tester@example.com"
    assert headers["x-tailscale-node-name"] == "laptop"
    assert headers["x-tailscale-node"] == str(laptop["node"]["id"])
    assert "x-tailscale-node-tags" not in headers  # untagged


def test_forged_node_headers_never_arrive(seen: dict[str, Any]) -> None:
    for name in ("builder", "laptop"):
        headers = seen[name]["headers"]
        assert "forged" not in str(headers).lower()
        assert "666" not in str(headers)
        assert "6.6.6.6" not in str(headers)
        assert "root@evil" not in str(headers)


def test_the_directory_reports_itself_and_keeps_the_secret(seen: dict[str, Any]) -> None:
    directory = seen["status"]["whois_directory"]
    assert directory["failures"] == 0
    assert directory["lookups"]["hit"] >= 4  # two requests from each node
    assert seen["log_has_secret"] is False
    assert seen["timings"]["laptop checked"] < 30
