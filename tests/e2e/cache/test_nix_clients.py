"""Both real Nix clients (Debian's 2.8, trixie's 2.26 in a chroot) against the real server.

test_nix_client.py runs the 2.8 client over every store backend; this module runs what differs between client
versions with both: signed copies, verify, substitution, a wrong key, the zstd paths, resume, HTTP/2 over TLS.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cache_server import CacheServer, start_cache
from tests.support.clients import NixClient
from tests.support.fixtures import Fixtures

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def plain_cache(
    tmp_path_factory: pytest.TempPathFactory, nix_daemon_env: dict[str, str]
) -> Iterator[CacheServer]:
    """The server as the fleet runs it, without compressed copies: every NAR is streamed as it is."""
    with start_cache(
        tmp_path_factory.mktemp("cache-clients"), priority=60, enable_compression=False
    ) as server:
        yield server


def signed_env(client: NixClient, directory: Path, key: str, extra: str = "", **more: str) -> dict[str, str]:
    config = f"require-sigs = true\ntrusted-public-keys = {key}\nconnect-timeout = 5\n" + extra
    return client.env(directory / "xdg", config, **more)


def test_client_versions(nix_client: NixClient) -> None:
    expected = {"nix-2.8": "2.8.", "nix-2.26": "2.26."}[nix_client.name]
    assert nix_client.version.startswith(expected)
    out = nix_client.run(["nix", "--version"]).stdout
    assert nix_client.version in out


def test_signed_copy_and_verify(
    nix_client: NixClient,
    plain_cache: CacheServer,
    store_fixtures: Fixtures,
    client_dir: Path,
    host_nix_client: NixClient,
    nix_daemon_env: dict[str, str],
) -> None:
    env = signed_env(nix_client, client_dir, plain_cache.public_key)
    store = nix_client.inside(client_dir / "store")
    paths = [store_fixtures.tree, store_fixtures.single, store_fixtures.link]
    nix_client.run(["nix", "copy", "--from", plain_cache.url, "--to", store, *paths], env=env)
    for path in (*paths, store_fixtures.dep):
        copied = nix_client.path_info(path, env, store=store)
        original = host_nix_client.path_info(path, nix_daemon_env)
        assert copied["narHash"] == original["narHash"]
        assert sorted(copied["references"]) == sorted(original["references"])
        assert any(str(sig).startswith("test-cache-1:") for sig in copied["signatures"])
    verify = ["nix", "store", "verify", "--store", store, "-r", store_fixtures.tree]
    nix_client.run([*verify, "--trusted-public-keys", plain_cache.public_key], env=env)
    # the copy landed in the client's own store, under its root
    assert (
        client_dir / "store" / store_fixtures.tree.lstrip("/") / "self-reference"
    ).read_text().strip() == (store_fixtures.tree)
