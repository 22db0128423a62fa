"""Paths Nix registers while the cache runs: every worker learns them before any client asks.

Against the real Nix database and daemon: the database's stamps (what changed since metadata was
read), a closure built a moment ago fetched by both real clients without any request asking the
store, and what must still show at once (a signature added, a path collected) with other builds
committing in between.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
import trio

from cache.app import METADATA_TTL, NEW_PATHS_POLL
from cache.store import DbStore
from tests.support.cache_server import CacheServer, start_cache
from tests.support.clients import NixClient
from tests.support.fixtures import _MK, unique_path_expr
from tests.support.nix import build, run

pytestmark = pytest.mark.e2e

NIX_DB = Path("/nix/var/nix/db/db.sqlite")


def lookups(cache: CacheServer) -> dict[str, int]:
    text = httpx.get(f"{cache.url}/metrics", timeout=10).text
    return {m[1]: int(m[2]) for m in re.finditer(r'harmonia_store_lookups_total\{by="(\w+)"\} (\d+)', text)}


def wait_until_learnt(cache: CacheServer, before: dict[str, int], count: int) -> None:
    """Until the watch for new paths has looked up `count` more paths, then one more poll (the
    one after the build's last commit vouches again for what was learnt before it)."""
    deadline = time.monotonic() + 30
    while lookups(cache)["registration"] < before["registration"] + count:
        assert time.monotonic() < deadline, f"not learnt within 30 s: {lookups(cache)}"
        time.sleep(0.2)
    time.sleep(NEW_PATHS_POLL + 0.5)


def chain_expr(tag: str, length: int) -> str:
    """A closure like a build's: each path refers to the one before."""
    parts = [f'p0 = mk "hc-new-{tag}-0" "/bin/echo first > $out" {{}};']
    for i in range(1, length):
        parts.append(f'p{i} = mk "hc-new-{tag}-{i}" "/bin/echo ${{p{i - 1}}} {i} > $out" {{}};')
    return "let" + _MK + " ".join(parts) + f" in p{length - 1}"


def test_the_database_tells_what_changed_for_a_path(nix_daemon_env: dict[str, str]) -> None:
    """Another path registered changes the database but not this path's row; a signature added
    to it, or its deletion, does."""
    db = DbStore(NIX_DB, "/nix/store", "/nix/store")
    path = build(unique_path_expr(f"stamp-{time.time_ns()}"), nix_daemon_env)[0]
    stamp = db.stamp(path)
    assert stamp is not None and stamp.row is not None
    assert db.unchanged(stamp, path) == stamp
    # the look-ahead's and the watch's stamps come with the metadata, from the same query
    info, with_info = trio.run(db.stamped_path_info, path)
    assert info is not None and info.path == path and with_info.row == stamp.row

    build(unique_path_expr(f"stamp-other-{time.time_ns()}"), nix_daemon_env)
    time.sleep(0.1)  # past the reuse of one generation reading
    newer = db.unchanged(stamp, path)
    assert newer is not None and newer.generation != stamp.generation and newer.row == stamp.row

    key = Path(nix_daemon_env["HOME"]) / f"stamp-key-{time.time_ns()}"
    run(
        ["nix-store", "--generate-binary-cache-key", "stamp-key-1", str(key), f"{key}.pub"],
        env=nix_daemon_env,
    )
    run(["nix", "store", "sign", "--key-file", str(key), path], env=nix_daemon_env)
    time.sleep(0.1)
    assert db.unchanged(newer, path) is None

    signed = db.stamp(path)
    assert signed is not None
    run(["nix-store", "--delete", path], env=nix_daemon_env)
    time.sleep(0.1)
    assert db.unchanged(signed, path) is None
    assert db.stamp(path) is not None and db.stamp(path).row is None  # type: ignore[union-attr]


@pytest.mark.parametrize("backend", ["db", "daemon"])
def test_a_closure_built_a_moment_ago_is_served_without_asking_the_store(
    tmp_path: Path,
    nix_daemon_env: dict[str, str],
    nix_client: NixClient,
    client_dir: Path,
    backend: str,
) -> None:
    """Every worker learns new paths as Nix registers them: a client fetching them right after the
    build waits for no store query (not even a look-ahead one), and gets them signed."""
    length = 12
    with start_cache(tmp_path, store_backend=backend, workers=2) as cache:
        before = lookups(cache)
        top = build(chain_expr(f"{backend}-{nix_client.name}-{time.time_ns()}", length), nix_daemon_env)[0]
        wait_until_learnt(cache, before, 2 * length)  # both workers
        learnt = lookups(cache)

        config = f"require-sigs = true\ntrusted-public-keys = {cache.public_key}\nconnect-timeout = 5\n"
        env = nix_client.env(client_dir / "xdg", config)
        store = nix_client.inside(client_dir / "store")
        nix_client.run(["nix", "copy", "--from", cache.url, "--to", store, top], env=env)
        copied = nix_client.run(["nix-store", "--store", store, "-qR", top], env=env).stdout.split()
        assert len(copied) == length

        after = lookups(cache)
        assert after["request"] == learnt["request"], (learnt, after)
        assert after["look_ahead"] == learnt["look_ahead"], (learnt, after)


@pytest.mark.parametrize("backend", ["db", "daemon"])
def test_what_changes_after_registration_still_shows(
    tmp_path: Path, nix_daemon_env: dict[str, str], backend: str
) -> None:
    """A path learnt as it was registered: a signature added later shows within METADATA_TTL,
    although other builds commit in between; once collected it is a 404 at once."""
    with start_cache(tmp_path, store_backend=backend) as cache:
        before = lookups(cache)
        path = build(unique_path_expr(f"new-sign-{backend}-{time.time_ns()}"), nix_daemon_env)[0]
        wait_until_learnt(cache, before, 1)
        url = f"{cache.url}/{Path(path).name[:32]}.narinfo"
        assert httpx.get(url, timeout=20).status_code == 200

        # another build commits: the path's row is unchanged, its entry still served
        build(unique_path_expr(f"new-other-{backend}-{time.time_ns()}"), nix_daemon_env)
        time.sleep(NEW_PATHS_POLL + METADATA_TTL)
        served = lookups(cache)["request"]
        assert "Sig: later-key-1:" not in httpx.get(url, timeout=20).text
        assert lookups(cache)["request"] == served

        key = tmp_path / "later-key"
        run(
            ["nix-store", "--generate-binary-cache-key", "later-key-1", str(key), f"{key}.pub"],
            env=nix_daemon_env,
        )
        run(["nix", "store", "sign", "--key-file", str(key), path], env=nix_daemon_env)
        time.sleep(METADATA_TTL + 0.2)
        narinfo = httpx.get(url, timeout=20).text
        assert "Sig: later-key-1:" in narinfo and "Sig: test-cache-1:" in narinfo

        run(["nix-store", "--delete", path], env=nix_daemon_env)
        assert httpx.get(url, timeout=20).status_code == 404
