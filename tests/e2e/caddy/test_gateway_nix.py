"""The real Nix client through the rendered gateway (Debian's Caddy, `tls internal`) to harmonia-cache.

`nix copy --from https://127.0.0.1:<port>` with `require-sigs`, trusting Caddy's local CA through
NIX_SSL_CERT_FILE; NAR bytes compared with `nix-store --dump`; failover to a second upstream;
502/503 while the cache is down, and recovery when it is back.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import zstandard

from caddy.policy import Policy
from tests.e2e.caddy.gateway_support import IO_TIMEOUT, Gateway, refused_address, run_gateway, wait_for
from tests.support.cache_server import start_cache
from tests.support.clients import NixClient
from tests.support.fixtures import Fixtures
from tests.support.nix import dump, nix_env, path_info, run

pytestmark = pytest.mark.e2e


def _client_env(tmp_path: Path, gw: Gateway, public_key: str) -> dict[str, str]:
    return nix_env(
        tmp_path / "client-xdg",
        extra_config=f"require-sigs = true\ntrusted-public-keys = {public_key}\n",
        NIX_SSL_CERT_FILE=str(gw.ca_file),
    )


def _nix_copy(gw: Gateway, env: dict[str, str], root: Path, *paths: str, check: bool = True):
    return run(
        ["nix", "copy", "--from", gw.url, "--to", f"local?root={root}", *paths],
        env=env,
        timeout=300,
        check=check,
    )


def _direct(url: str, path: str) -> bytes:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 200
        return response.read()
    finally:
        conn.close()


def _nar_through_gateway(gw: Gateway, cache_url: str, path: str) -> bytes:
    """The NAR as the narinfo's URL serves it through the gateway, checked against the cache."""
    hash_part = Path(path).name.split("-", 1)[0]
    status, _, narinfo = gw.request("GET", f"/{hash_part}.narinfo")
    assert status == 200
    fields = dict(line.split(": ", 1) for line in narinfo.decode().splitlines() if ": " in line)
    status, headers, body = gw.request("GET", "/" + fields["URL"], timeout=120)
    assert status == 200
    assert "content-encoding" not in headers  # Nix 2.8 asks for none; nothing may add one
    # byte for byte what the cache itself serves
    assert hashlib.sha256(body).digest() == hashlib.sha256(_direct(cache_url, "/" + fields["URL"])).digest()
    if fields["Compression"] == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(body)
    assert fields["Compression"] == "none"
    return body


def test_nix_copy_through_the_gateway_with_signatures_and_unchanged_nars(
    tmp_path: Path,
    store_fixtures: Fixtures,
    nix_daemon_env: dict[str, str],
    client_root: Path,
) -> None:
    with start_cache(tmp_path / "cache", priority=60) as cache, run_gateway(tmp_path, [cache.url]) as gw:
        status, _, info = gw.request("GET", "/nix-cache-info")
        assert status == 200
        assert b"Priority: 60" in info

        env = _client_env(tmp_path, gw, cache.public_key)
        _nix_copy(gw, env, client_root, store_fixtures.tree)
        for path in (store_fixtures.tree, store_fixtures.dep):
            copied = path_info(path, env, store=f"local?root={client_root}")
            original = path_info(path, nix_daemon_env)
            assert copied["narHash"] == original["narHash"]

        # NAR bytes arrive unchanged, the big one included
        tree = _nar_through_gateway(gw, cache.url, store_fixtures.tree)
        assert tree == dump(store_fixtures.tree, nix_daemon_env)
        big = _nar_through_gateway(gw, cache.url, store_fixtures.big)
        assert (
            hashlib.sha256(big).hexdigest()
            == hashlib.sha256(dump(store_fixtures.big, nix_daemon_env)).hexdigest()
        )

        # require-sigs is in force: a client trusting another key refuses the same paths
        wrong = "other-cache-1:" + "A" * 43 + "="
        refused = _nix_copy(
            gw,
            _client_env(tmp_path / "wrong", gw, wrong),
            tmp_path / "wrong-root",
            store_fixtures.single,
            check=False,
        )
        assert refused.returncode != 0
        assert "lacks a valid signature" in refused.stderr

        # the tailnet-only routes stay tailnet-only: the cache serves them, the gateway does not
        hash_part = Path(store_fixtures.tree).name.split("-", 1)[0]
        assert _direct(cache.url, f"/serve/{hash_part}/dir/one-byte") == b"x"
        for path in (f"/serve/{hash_part}/dir/one-byte", "/metrics", f"/serve/{hash_part}/"):
            assert gw.request("GET", path)[0] == 404, path


def test_both_clients_copy_through_the_gateway_over_http2(
    nix_client: NixClient,
    tmp_path: Path,
    store_fixtures: Fixtures,
    client_dir: Path,
    host_nix_client: NixClient,
    nix_daemon_env: dict[str, str],
) -> None:
    """Nix 2.8 and 2.26 through the gateway (compressed copies on, as the fleet runs it): a signed copy over
    HTTP/2, as Caddy's access log shows for every request the client made, and never `identity` coding."""
    with (
        start_cache(tmp_path / "cache", priority=60, zstd={"level": 3}) as cache,
        run_gateway(tmp_path, [cache.url]) as gw,
    ):
        ca = client_dir / "gateway-ca.pem"
        shutil.copyfile(gw.ca_file, ca)
        env = nix_client.env(
            client_dir / "xdg",
            f"require-sigs = true\ntrusted-public-keys = {cache.public_key}\n",
            NIX_SSL_CERT_FILE=nix_client.inside(ca),
        )
        store = nix_client.inside(client_dir / "store")
        nix_client.run(["nix", "copy", "--from", gw.url, "--to", store, store_fixtures.tree], env=env)
        for path in (store_fixtures.tree, store_fixtures.dep):
            copied = nix_client.path_info(path, env, store=store)
            assert copied["narHash"] == host_nix_client.path_info(path, nix_daemon_env)["narHash"]

        def client_entries() -> list[dict[str, Any]]:
            lines = gw.access_log.read_text().splitlines() if gw.access_log.exists() else []
            entries = [json.loads(line) for line in lines]
            agent = f"Nix/{nix_client.version}"
            return [
                e for e in entries if any(agent in ua for ua in e["request"]["headers"].get("User-Agent", []))
            ]

        entries = wait_for(lambda: [e for e in client_entries() if "/nar/" in e["request"]["uri"]], timeout=5)
        assert entries, gw.access_log.read_text()
        entries = client_entries()
        assert {e["request"]["proto"] for e in entries} == {"HTTP/2.0"}, entries
        for entry in entries:
            assert "identity" not in entry.get("resp_headers", {}).get("Content-Encoding", []), entry


def test_nix_copy_fails_over_when_the_first_upstream_is_down(
    tmp_path: Path,
    store_fixtures: Fixtures,
    client_root: Path,
) -> None:
    with (
        refused_address() as dead,
        start_cache(tmp_path / "cache") as cache,
        run_gateway(tmp_path, [f"http://{dead}", cache.url]) as gw,
    ):
        env = _client_env(tmp_path, gw, cache.public_key)
        start = time.monotonic()
        _nix_copy(gw, env, client_root, store_fixtures.single, store_fixtures.link)
        assert time.monotonic() - start < 60
        info = path_info(store_fixtures.link, env, store=f"local?root={client_root}")
        assert info["references"] == [store_fixtures.dep] or store_fixtures.dep in info["references"]


def test_gateway_answers_502_or_503_promptly_while_the_cache_is_down_and_recovers(
    tmp_path: Path,
    store_fixtures: Fixtures,
    client_root: Path,
) -> None:
    policy = Policy()
    cache_dir = tmp_path / "cache"
    with ExitStack() as stack:
        with start_cache(cache_dir) as cache:
            bind, public_key = cache.hostport, cache.public_key
            gw = stack.enter_context(run_gateway(tmp_path, [cache.url], policy))
            assert gw.request("GET", "/nix-cache-info")[0] == 200
            cache.proc.kill()  # the cache crashes (a graceful stop would only take longer)
            cache.proc.wait(IO_TIMEOUT)
        # the cache is down: the gateway answers fast, and keeps doing so
        for _ in range(2):
            start = time.monotonic()
            status, _, _ = gw.request("GET", "/nix-cache-info")
            elapsed = time.monotonic() - start
            assert status in (502, 503)
            assert elapsed < policy.try_duration_s + policy.dial_timeout_s + 2, elapsed

        with start_cache(cache_dir, bind=bind) as again:
            assert again.public_key == public_key
            recovered = wait_for(
                lambda: gw.request("GET", "/nix-cache-info")[0] == 200,
                timeout=policy.fail_duration_s + 3 * policy.health_interval_s,
            )
            assert recovered, "the gateway did not recover when the cache came back"
            env = _client_env(tmp_path, gw, public_key)
            _nix_copy(gw, env, client_root, store_fixtures.single)
            info = path_info(store_fixtures.single, env, store=f"local?root={client_root}")
            assert info["narSize"] > 0
            again.proc.kill()  # not part of the test: skip the graceful stop's drain
