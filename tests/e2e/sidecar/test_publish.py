"""The sidecar on the local tailnet, with real nodes, inside a throwaway network namespace.

One scenario (tests/e2e/sidecar/scenarios.py: ``publish``) runs the real ``harmonia-sidecar``
process with two services; the tests below each check one thing it saw.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.tailnet.netns import Netns, run_in_netns_sync

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("require_real_nodes")]

USER = "tester@example.com"


@pytest.fixture(scope="module")
def seen(netns_module: Netns, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("sidecar-publish")
    result: dict[str, Any] = run_in_netns_sync(
        netns_module,
        "tests.e2e.sidecar.scenarios:publish",
        {"workdir": str(workdir), "host": netns_module.address},
        timeout=240,
    )
    return result


def test_each_service_is_its_own_node_with_status(seen: dict[str, Any]) -> None:
    nodes = {n["name"]: n for n in seen["status_first"]["nodes"]}
    assert set(nodes) == {"echo", "filtered", "secure"}
    for name, node in nodes.items():
        assert node["state"] == "running"
        assert seen["node_first"][name]["ipv4"] in node["addresses"]
    assert nodes["echo"]["state_dir"] != nodes["filtered"]["state_dir"]
    code, printed = seen["status_printed"]
    assert code == 0
    for name in nodes:
        line = next(line for line in printed.splitlines() if line.startswith(name + " "))
        assert "running" in line
        assert seen["node_first"][name]["ipv4"] in line


def test_user_identity_reaches_the_upstream_and_forgery_does_not(seen: dict[str, Any]) -> None:
    assert seen["user_status"] == 200
    headers = seen["user_seen"]["headers"]
    assert headers["x-tailscale-user-loginname"] == USER
    assert headers["x-tailscale-user"] == USER
    assert headers["x-tailscale-user-loginname-localpart"] == "tester"
    assert headers["x-tailscale-user-loginname-domain"] == "example.com"
    assert headers["x-tailscale-user-displayname"] == "Test User"
    assert headers["tailscale-user-login"] == USER
    assert headers["x-tailscale-node-addr"] == seen["laptop_addresses"][0]
    assert "forged" not in str(headers)
    assert "root@evil" not in str(headers)
    assert "6.6.6.6" not in str(headers)


def test_tagged_node_is_served_with_node_identity_only(seen: dict[str, Any]) -> None:
    assert seen["tagged_status"] == 200
    headers = seen["tagged_seen"]["headers"]
    assert headers["x-tailscale-node-addr"] == seen["server_addresses"][0]
    assert not [h for h in headers if h.startswith(("x-tailscale-user", "tailscale-user"))]
    assert "forged" not in str(headers)


def test_https_with_a_custom_certificate(seen: dict[str, Any]) -> None:
    assert seen["secure"] == [200, "/tls", USER, "https"]


def test_prefixes_answer_404_outside(seen: dict[str, Any]) -> None:
    assert seen["allowed"] == [200, "/x"]
    assert seen["outside"][0] == 404


def test_killed_engine_comes_back_with_the_same_nodes(seen: dict[str, Any]) -> None:
    assert seen["status_again"]["engine_restarts"] >= 1
    assert seen["node_again"] == seen["node_first"]
    before = {n["name"]: n["addresses"] for n in seen["status_first"]["nodes"]}
    after = {n["name"]: n["addresses"] for n in seen["status_again"]["nodes"]}
    assert after == before
    assert not [n for n in seen["node_names"] if n.startswith(("echo-", "filtered-"))]


def test_sighup_adds_a_service_with_a_minted_key(seen: dict[str, Any]) -> None:
    assert seen["minted_path"] == "/m"
    assert seen["node_minted"]["tags"] == ["tag:minted"]
    assert seen["still_status"] == 200
    # the others kept their nodes and the engine was not restarted for it
    assert seen["pid_after_sighup"] == seen["status_again"]["engine_pid"]


def test_clean_stop_and_no_secret_in_logs(seen: dict[str, Any]) -> None:
    assert seen["exit_code"] == 0
    ready = [n for n in seen["notifications"] if n.startswith("READY=1")]
    assert len(ready) == 1
    assert "echo 100.64." in ready[0]
    assert seen["notifications"][-1] == "STOPPING=1"
    assert seen["log_has_secret"] is False


def test_a_node_that_cannot_join_fails_the_start_within_the_timeout(
    tailnet_netns: Netns, tmp_path_factory: pytest.TempPathFactory
) -> None:
    workdir = tmp_path_factory.mktemp("sidecar-timeout")
    seen = run_in_netns_sync(
        tailnet_netns,
        "tests.e2e.sidecar.scenarios:startup_timeout",
        {"workdir": str(workdir), "host": tailnet_netns.address},
        timeout=90,
    )
    assert seen["exit_code"] == 4
    assert seen["seconds"] < 30
    assert any("not on the tailnet after 4s: lonely" in line for line in seen["error_lines"])
