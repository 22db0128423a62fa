"""The real Nix client against the real server: copy, substitute, verify, refuse a wrong key."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.support.cache_server import CacheServer
from tests.support.fixtures import Fixtures
from tests.support.nix import dump, nix_env, path_info, run

pytestmark = pytest.mark.e2e


def client_env(tmp_path: Path, cache: CacheServer, key: str | None = None) -> dict[str, str]:
    return nix_env(
        tmp_path / "xdg-cache",
        extra_config=(
            f"require-sigs = true\ntrusted-public-keys = {key or cache.public_key}\nconnect-timeout = 5\n"
        ),
    )


def test_cache_info(cache: CacheServer) -> None:
    resp = httpx.get(f"{cache.url}/nix-cache-info", timeout=10)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/x-nix-cache-info"
    assert resp.text == "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 60\n"


def test_nix_copy_closure_with_signatures(
    cache: CacheServer, store_fixtures: Fixtures, tmp_path: Path, client_root: Path
) -> None:
    env = client_env(tmp_path, cache)
    run(
        [
            "nix",
            "copy",
            "--from",
            cache.url,
            "--to",
            str(client_root),
            store_fixtures.tree,
            store_fixtures.single,
            store_fixtures.link,
        ],
        env=env,
    )
    for path in (store_fixtures.tree, store_fixtures.dep, store_fixtures.single, store_fixtures.link):
        copied = path_info(path, env, store=str(client_root))
        original = path_info(path, env)
        assert copied["narHash"] == original["narHash"]
        assert sorted(copied["references"]) == sorted(original["references"])
        assert any(sig.startswith("test-cache-1:") for sig in copied.get("signatures", []))
    run(
        [
            "nix",
            "store",
            "verify",
            "--store",
            str(client_root),
            "-r",
            store_fixtures.tree,
            "--trusted-public-keys",
            cache.public_key,
        ],
        env=env,
    )


def test_nix_copy_big_path(
    cache: CacheServer, store_fixtures: Fixtures, tmp_path: Path, client_root: Path
) -> None:
    env = client_env(tmp_path, cache)
    run(
        ["nix", "copy", "--from", cache.url, "--to", str(client_root), store_fixtures.big],
        env=env,
        timeout=300,
    )
    assert (
        path_info(store_fixtures.big, env, store=str(client_root))["narHash"]
        == path_info(store_fixtures.big, env)["narHash"]
    )


def test_substitution_with_nix_store_realise(
    cache: CacheServer, store_fixtures: Fixtures, tmp_path: Path, client_root: Path
) -> None:
    env = client_env(tmp_path, cache)
    out = run(
        [
            "nix-store",
            "--store",
            str(client_root),
            "-r",
            store_fixtures.link,
            "--option",
            "substituters",
            cache.url,
        ],
        env=env,
    )
    assert store_fixtures.link in out.stdout
    target = client_root / store_fixtures.link.lstrip("/")
    assert target.is_symlink()


def test_wrong_key_is_refused(
    cache: CacheServer, store_fixtures: Fixtures, tmp_path: Path, client_root: Path
) -> None:
    other = "other-key-1:" + "A" * 43 + "="
    env = client_env(tmp_path, cache, key=other)
    proc = run(
        ["nix", "copy", "--from", cache.url, "--to", str(client_root), store_fixtures.single],
        env=env,
        check=False,
    )
    assert proc.returncode != 0
    assert "lacks a valid signature" in proc.stderr


def test_nar_bytes_equal_nix_store_dump(
    cache: CacheServer, store_fixtures: Fixtures, nix_daemon_env: dict[str, str]
) -> None:
    with httpx.Client(base_url=cache.url, timeout=60) as client:
        for path in store_fixtures.small:
            hash_part = Path(path).name[:32]
            narinfo = client.get(f"/{hash_part}.narinfo")
            assert narinfo.status_code == 200
            url = next(line[5:] for line in narinfo.text.splitlines() if line.startswith("URL: "))
            nar = client.get(f"/{url}")
            assert nar.status_code == 200
            assert nar.headers["content-type"] == "application/x-nix-nar"
            assert nar.content == dump(path, nix_daemon_env)


def test_nix_consumes_the_compressed_copy(
    tmp_path: Path, store_fixtures: Fixtures, client_root: Path, nix_daemon_env: dict[str, str]
) -> None:
    """Nix 2.8 sends no Accept-Encoding: it gets zstd through the narinfo's compressed copy."""
    import time

    from tests.support.cache_server import start_cache

    with start_cache(tmp_path / "srv", zstd={"level": 3}) as cache:
        hash_part = Path(store_fixtures.big).name[:32]
        deadline = time.monotonic() + 120
        while "Compression: zstd" not in httpx.get(f"{cache.url}/{hash_part}.narinfo", timeout=10).text:
            assert time.monotonic() < deadline, "no compressed copy after 120 s"
            time.sleep(0.3)
        env = client_env(tmp_path, cache)
        run(
            ["nix", "copy", "--from", cache.url, "--to", str(client_root), store_fixtures.big],
            env=env,
            timeout=300,
        )
        assert (
            path_info(store_fixtures.big, env, store=str(client_root))["narHash"]
            == path_info(store_fixtures.big, nix_daemon_env)["narHash"]
        )
        metrics = httpx.get(f"{cache.url}/metrics", timeout=10).text
        sent = next(
            line for line in metrics.splitlines() if line.startswith('harmonia_bytes_sent_total{route="nar"}')
        )
        # the compressed copy went over the wire, not the 196 MB NAR
        assert int(sent.split()[-1]) < 0.5 * 195_000_000


def _nar_bytes_sent(cache_url: str) -> int:
    metrics = httpx.get(f"{cache_url}/metrics", timeout=10).text
    for line in metrics.splitlines():
        if line.startswith('harmonia_bytes_sent_total{route="nar"}'):
            return int(line.split()[-1])
    return 0


def test_a_freshly_built_path_goes_out_compressed_from_its_first_fetch(
    tmp_path: Path, nix_daemon_env: dict[str, str]
) -> None:
    """Nix 2.8 (no Accept-Encoding) gets zstd on the first fetch of a path nobody asked for yet:
    a path registered while the cache runs is compressed as it appears (no request needed), and
    one fetched at once is streamed through the compressor."""
    import time

    from cache.compression import MIN_COMPRESS_SIZE
    from cache.hashes import nix32_encode, parse_sha256
    from tests.support.cache_server import start_cache
    from tests.support.fixtures import _MK
    from tests.support.nix import build

    def fresh(tag: str) -> str:
        # about 2.7 MB of decimal numbers, a path no other test has; its .drv over 512 bytes
        expr = (
            "let"
            + _MK
            + f'in mk "hc-seq-{tag}-{time.time_ns()}" "/usr/bin/seq 1 400000 > $out" {{ note = "{"x" * 200}"; }}'
        )
        return build(expr, nix_daemon_env)[0]

    with start_cache(tmp_path / "srv", zstd={"level": 3}) as cache:
        watched = fresh("watched")
        info = path_info(watched, nix_daemon_env)
        meta = (
            tmp_path
            / "srv"
            / "state"
            / "nar-zstd"
            / f"{nix32_encode(parse_sha256(str(info['narHash'])))}.meta"
        )
        deadline = time.monotonic() + 30
        while not meta.exists():
            assert time.monotonic() < deadline, "a newly registered path was not compressed within 30 s"
            time.sleep(0.2)
        # its derivation, registered before it in the same build, was passed over: a .drv is
        # rarely fetched, and its copy is made when it is
        drv_path = str(info["deriver"])
        drv_hash = run(["nix-store", "--query", "--hash", drv_path], env=nix_daemon_env).stdout.strip()
        drv_size = run(["nix-store", "--query", "--size", drv_path], env=nix_daemon_env).stdout.strip()
        assert int(drv_size) >= MIN_COMPRESS_SIZE  # big enough to be compressed when asked for
        assert not meta.with_name(f"{nix32_encode(parse_sha256(drv_hash))}.meta").exists()
        at_once = fresh("at-once")
        for n, path in enumerate((at_once, watched)):
            before = _nar_bytes_sent(cache.url)
            root = tmp_path / f"client-{n}"
            env = client_env(tmp_path / f"c{n}", cache)
            run(["nix", "copy", "--from", cache.url, "--to", str(root), path], env=env, timeout=120)
            copied = path_info(path, env, store=str(root))
            original = path_info(path, nix_daemon_env)
            assert copied["narHash"] == original["narHash"]
            sent = _nar_bytes_sent(cache.url) - before
            assert 0 < sent < 0.5 * int(str(original["narSize"])), (path, sent)
