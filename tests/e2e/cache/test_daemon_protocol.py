"""Our nix-daemon protocol client against the real daemon (Nix 2.8, protocol 1.34)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import trio

from cache.daemon import DaemonError, DaemonStore
from cache.hashes import sha256_nix32
from cache.store import FsNar, StreamedNar
from tests.support.fixtures import Fixtures
from tests.support.nix import dump, path_info

pytestmark = pytest.mark.e2e
SOCKET = Path("/nix/var/nix/daemon-socket/socket")


async def test_queries_match_nix(store_fixtures: Fixtures, nix_daemon_env: dict[str, str]) -> None:
    store = DaemonStore(SOCKET, "/nix/store", "/nix/store", prefer_files=False)
    try:
        with trio.fail_after(30):
            tree = store_fixtures.tree
            assert await store.path_from_hash_part(Path(tree).name[:32]) == tree
            assert await store.path_from_hash_part("0" * 32) is None
            found = await store.info_from_hash_part(Path(tree).name[:32])
            assert found is not None and found.path == tree
            assert await store.info_from_hash_part("0" * 32) is None
            info = await store.path_info(tree)
            assert info is not None
            expected = path_info(tree, nix_daemon_env)
            assert info.nar_size == expected["narSize"]
            assert sorted(info.references) == sorted(expected["references"])  # type: ignore[arg-type]
            assert info.deriver == expected.get("deriver")
            assert await store.path_info("/nix/store/" + "0" * 32 + "-gone") is None
    finally:
        await store.aclose()


async def test_a_daemon_error_is_reported_and_the_connection_still_serves(
    store_fixtures: Fixtures, nix_daemon_env: dict[str, str]
) -> None:
    """The daemon's error (read with the answer, in one go) is a DaemonError naming what it
    said; the pool goes on answering on the connections it keeps."""
    store = DaemonStore(SOCKET, "/nix/store", "/nix/store", prefer_files=False)
    try:
        with trio.fail_after(30):
            for _ in range(3):
                with pytest.raises(DaemonError, match="not in the Nix store"):
                    await store.path_info("/tmp/not-a-store-path")
                info = await store.path_info(store_fixtures.tree)
                assert info is not None and info.path == store_fixtures.tree
    finally:
        await store.aclose()


async def test_nar_from_path_is_nix_store_dump(
    store_fixtures: Fixtures, nix_daemon_env: dict[str, str]
) -> None:
    store = DaemonStore(SOCKET, "/nix/store", "/nix/store", prefer_files=False)
    try:
        with trio.fail_after(120):
            for path in (store_fixtures.tree, store_fixtures.single, store_fixtures.big):
                info = await store.path_info(path)
                assert info is not None
                source = await store.nar(info)
                assert isinstance(source, StreamedNar)
                data = bytearray()
                async for chunk in source.open():
                    data += chunk
                assert len(data) == info.nar_size
                assert sha256_nix32(hashlib.sha256(data).digest()) == sha256_nix32(info.nar_hash)
                if path != store_fixtures.big:
                    assert bytes(data) == dump(path, nix_daemon_env)
            # the connection went back to the pool in a usable state after each NAR
            assert await store.path_from_hash_part(Path(store_fixtures.tree).name[:32]) == store_fixtures.tree
    finally:
        await store.aclose()


async def test_readable_files_are_preferred(store_fixtures: Fixtures, nix_daemon_env: dict[str, str]) -> None:
    store = DaemonStore(SOCKET, "/nix/store", "/nix/store")
    try:
        with trio.fail_after(30):
            info = await store.path_info(store_fixtures.tree)
            assert info is not None
            assert isinstance(await store.nar(info), FsNar)
    finally:
        await store.aclose()
