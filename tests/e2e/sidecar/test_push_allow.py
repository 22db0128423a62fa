"""The sidecar's node serves /push, optionally only to some callers (``push_allow``), with real
nodes on the local tailnet: a user's node and a tagged node, the whois directory on."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.sidecar.push import BODY
from tests.tailnet.netns import Netns, run_in_netns_sync

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("require_real_nodes")]


@pytest.fixture(scope="module")
def seen(netns_module: Netns, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("sidecar-push")
    result: dict[str, Any] = run_in_netns_sync(
        netns_module,
        "tests.e2e.sidecar.push:push_allow",
        {"workdir": str(workdir), "host": netns_module.address},
        timeout=300,
    )
    return result


def _served(result: dict[str, Any], path: str) -> None:
    assert result["status"] == 200, result
    assert result["seen_by_upstream"] == path
    assert result["upstream_bytes"] == [len(BODY)]  # the whole body arrived


def _refused(result: dict[str, Any]) -> None:
    assert result["status"] == 403, result
    assert result["answer"] == "403 this caller may not push here\n"
    assert result["upstream_bytes"] == []  # nothing reached the cache


def test_without_push_allow_every_caller_pushes(seen: dict[str, Any]) -> None:
    _served(seen["laptop"]["open"], "/push/nar/laptop.nar")
    _served(seen["server"]["open"], "/push/nar/server.nar")


def test_a_user_rule_admits_that_user_only(seen: dict[str, Any]) -> None:
    _served(seen["laptop"]["users"], "/push/nar/laptop.nar")
    _refused(seen["server"]["users"])


def test_a_tag_rule_admits_that_tag_only(seen: dict[str, Any]) -> None:
    _served(seen["server"]["tagged"], "/push/nar/server.nar")
    _refused(seen["laptop"]["tagged"])
