"""Real Tailscale nodes on the local tailnet, inside a throwaway network namespace.

One scenario per module runs in a child process inside the namespace (arkitekt-mesh lives in the
process that starts it); the tests below each check one thing it saw.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from tests.e2e.tailnet.scenarios import WEB_BODY
from tests.tailnet.netns import REPO_ROOT, Netns, child_env, run_in_netns, run_in_netns_sync

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("require_real_nodes")]


@pytest.fixture(scope="module")
def seen(netns_module: Netns, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("two-nodes")
    return cast(
        dict[str, Any],
        run_in_netns_sync(
            netns_module,
            "tests.e2e.tailnet.scenarios:two_nodes",
            {"workdir": str(workdir), "host": netns_module.address},
            timeout=180,
        ),
    )


def test_client_reaches_caddy_node_through_the_tailnet(seen: dict[str, Any]) -> None:
    assert seen["body"] == WEB_BODY
    assert seen["client_addresses"][0].startswith("100.64.")


def test_tailscale_auth_on_web_sees_the_clients_user(seen: dict[str, Any]) -> None:
    assert seen["whoami"] == "tester@example.com"


def test_tagged_node_is_served_but_refused_by_tailscale_auth(seen: dict[str, Any]) -> None:
    assert seen["tagged_body"] == WEB_BODY
    assert seen["tagged_whoami_status"] == 401


def test_restarted_caddy_node_keeps_its_name_and_address(seen: dict[str, Any]) -> None:
    assert seen["web_again"] == seen["web_first"]
    assert seen["web_first"]["name"] == "web"
    assert "web-1" not in seen["node_names"]


def test_ephemeral_node_leaves_the_peers_of_the_others(seen: dict[str, Any]) -> None:
    assert seen["eph_peer_of_web"] is True
    assert seen["eph_gone_from_web"] is True
    assert seen["eph_registered"] is False
    assert seen["web_netmap_dropped_eph"] is True


def test_wrong_auth_key_is_refused_and_others_still_join(tailnet_netns: Netns, tmp_path: Path) -> None:
    seen = run_in_netns_sync(
        tailnet_netns,
        "tests.e2e.tailnet.scenarios:refused_key",
        {"workdir": str(tmp_path), "host": tailnet_netns.address},
        timeout=90,
    )
    assert seen["error"] == ("Refused: the mesh refused this node: invalid auth key: unknown to this tailnet")
    assert "invalid auth key: unknown to this tailnet" in seen["caddy_log"]
    assert seen["nodes"] == ["good"]


async def test_cli_tailnet_serves_a_node_in_another_process(tailnet_netns: Netns, tmp_path: Path) -> None:
    server = await trio.lowlevel.open_process(
        tailnet_netns.argv([sys.executable, "-m", "tests.tailnet", "--host", tailnet_netns.address]),
        cwd=REPO_ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(20):
            assert server.stdout is not None
            line = bytearray()
            while not line.endswith(b"\n"):
                chunk = await server.stdout.receive_some(1)
                assert chunk, "python -m tests.tailnet exited before printing its JSON line"
                line += chunk
        info = json.loads(line)
        assert info["control_url"].startswith(f"http://{tailnet_netns.address}:")
        with trio.fail_after(60):
            seen = await run_in_netns(
                tailnet_netns,
                "tests.e2e.tailnet.scenarios:join_with_mesh",
                {"workdir": str(tmp_path), "control_url": info["control_url"], "auth_key": info["auth_key"]},
            )
        assert seen["addresses"][0].startswith("100.64.")
        server.terminate()
        with trio.fail_after(10):
            assert await server.wait() == 0
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()
