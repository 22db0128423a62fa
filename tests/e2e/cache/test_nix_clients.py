"""Both real Nix clients (Debian's 2.8, trixie's 2.26 in a chroot) against the real server.

test_nix_client.py runs the 2.8 client over every store backend; this module runs, with both clients,
what differs between client versions: signed copies and verify, substitution, a wrong key, the zstd
paths (2.26 sends `Accept-Encoding: zstd, …`, 2.8 none), resume after a cut, and HTTP/2 over TLS.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from tests.support.cache_server import CacheServer, start_cache
from tests.support.clients import NixClient, remove_tree
from tests.support.cutting_proxy import cutting_proxy, header
from tests.support.fixtures import Fixtures
from tests.tailnet.netns import netns, unavailable_reason

pytestmark = pytest.mark.e2e

WANTS_ZSTD = {"nix-2.8": False, "nix-2.26": True}  # Accept-Encoding: zstd since Nix 2.14


@pytest.fixture(scope="module")
def plain_cache(
    tmp_path_factory: pytest.TempPathFactory, nix_daemon_env: dict[str, str]
) -> Iterator[CacheServer]:
    """The server without compression: every NAR is the identity file, with ranges."""
    with start_cache(
        tmp_path_factory.mktemp("cache-clients"), priority=60, enable_compression=False
    ) as server:
        yield server


def signed_env(client: NixClient, directory: Path, key: str, **more: str) -> dict[str, str]:
    config = f"require-sigs = true\ntrusted-public-keys = {key}\nconnect-timeout = 5\n"
    return client.env(directory / "xdg", config, **more)


ACCESS = re.compile(
    r"harmonia\.access: \S+ (?P<method>\S+) (?P<path>\S+) (?P<proto>HTTP/\S+) (?P<status>\d+) (?P<sent>\d+) "
)


def access_log(cache: CacheServer, path_part: str = "/", at_least: int = 1) -> list[re.Match[str]]:
    """The server's access-log entries (log_level debug) for paths containing `path_part`.

    The log is read by a thread: wait a moment for entries of requests that just finished."""
    deadline = time.monotonic() + 5
    while True:
        found = [m for line in list(cache.lines) if (m := ACCESS.search(line)) and path_part in m["path"]]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def nar_bytes_sent(cache: CacheServer, nars: int) -> int:
    """Body bytes of the NAR GETs, once `nars` of them are logged."""
    return sum(int(m["sent"]) for m in access_log(cache, "/nar/", at_least=nars) if m["method"] == "GET")


def closure_nar_size(host: NixClient, daemon_env: dict[str, str], *closure: str) -> int:
    return sum(int(host.path_info(path, daemon_env)["narSize"]) for path in closure)


def wait_for_compressed_copy(cache: CacheServer, path: str) -> str:
    """Ask for the narinfo until the zstd copy exists (the narinfo names `.nar.zst` from the first
    answer and adds FileHash/FileSize once the copy is made); return its URL."""
    hash_part = Path(path).name[:32]
    deadline = time.monotonic() + 60
    while True:
        narinfo = httpx.get(f"{cache.url}/{hash_part}.narinfo", timeout=10).text
        if "Compression: zstd" in narinfo and "FileSize: " in narinfo:
            return next(line[5:] for line in narinfo.splitlines() if line.startswith("URL: "))
        assert time.monotonic() < deadline, "no compressed copy after 60 s"
        time.sleep(0.2)


def copy_and_check(
    client: NixClient,
    url: str,
    env: dict[str, str],
    store: str,
    path: str,
    host: NixClient,
    daemon_env: dict[str, str],
) -> None:
    client.run(["nix", "copy", "--from", url, "--to", store, path], env=env)
    assert client.path_info(path, env, store=store)["narHash"] == host.path_info(path, daemon_env)["narHash"]


def test_client_versions(nix_client: NixClient) -> None:
    expected = {"nix-2.8": "2.8.", "nix-2.26": "2.26."}[nix_client.name]
    assert nix_client.version.startswith(expected)
    assert nix_client.version in nix_client.run(["nix", "--version"]).stdout


def test_client_runs_inside_a_network_namespace(nix_client: NixClient, client_dir: Path) -> None:
    """`run(netns=…)`: the client reaches a server on the namespace's loopback, which the machine's lacks."""
    if (reason := unavailable_reason()) is not None:
        pytest.skip(reason)
    served = client_dir / "served"
    served.mkdir()
    (served / "nix-cache-info").write_text("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 41\n")
    url = "http://127.0.0.1:1"  # a port nothing listens on outside the namespace
    env = nix_client.env(client_dir / "xdg", "connect-timeout = 5\n")
    ping = ["nix", "store", "ping", "--store", url]
    with netns("hbcl") as ns:
        server = subprocess.Popen(
            ns.argv(
                [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(served), "1"]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 20
            while (inside := nix_client.run(ping, env=env, check=False, netns=ns.name)).returncode != 0:
                assert time.monotonic() < deadline, inside.stderr
                time.sleep(0.2)
            # not on the machine's loopback (a fresh narinfo cache: nix-cache-info is cached for a week)
            outside = nix_client.env(
                client_dir / "xdg-outside", "connect-timeout = 5\ndownload-attempts = 1\n"
            )
            assert nix_client.run(ping, env=outside, check=False).returncode != 0
        finally:
            server.terminate()
            server.wait(10)


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
    copied_file = client_dir / "store" / store_fixtures.tree.lstrip("/") / "self-reference"
    assert copied_file.read_text().strip() == store_fixtures.tree


def test_substitution(
    nix_client: NixClient, plain_cache: CacheServer, store_fixtures: Fixtures, client_dir: Path
) -> None:
    env = signed_env(nix_client, client_dir, plain_cache.public_key)
    store = nix_client.inside(client_dir / "store")
    out = nix_client.run(
        [
            "nix-store",
            "--store",
            store,
            "-r",
            store_fixtures.link,
            "--option",
            "substituters",
            plain_cache.url,
        ],
        env=env,
    )
    assert store_fixtures.link in out.stdout
    link = client_dir / "store" / store_fixtures.link.lstrip("/")
    assert link.is_symlink()
    assert (client_dir / "store" / store_fixtures.dep.lstrip("/") / "file").read_text() == "dependency\n"


def test_wrong_key_is_refused(
    nix_client: NixClient, plain_cache: CacheServer, store_fixtures: Fixtures, client_dir: Path
) -> None:
    env = signed_env(nix_client, client_dir, "other-key-1:" + "A" * 43 + "=")
    store = nix_client.inside(client_dir / "store")
    proc = nix_client.run(
        ["nix", "copy", "--from", plain_cache.url, "--to", store, store_fixtures.single], env=env, check=False
    )
    assert proc.returncode != 0
    # 2.8: "lacks a valid signature"; 2.26: "lacks a signature by a trusted key"
    assert re.search(r"lacks a (valid )?signature", proc.stderr), proc.stderr
    assert not (client_dir / "store" / store_fixtures.single.lstrip("/")).exists()


def test_live_zstd_stream(
    nix_client: NixClient,
    store_fixtures: Fixtures,
    client_dir: Path,
    tmp_path: Path,
    host_nix_client: NixClient,
    nix_daemon_env: dict[str, str],
) -> None:
    """No compressed copies (the state directory cannot hold them): the narinfo still names
    `.nar.zst`, made on the fly, so both clients get compressed bytes, with or without Accept-Encoding;
    the refusal is one warning."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "nar-zstd").write_text("not a directory")  # copies impossible, compression still on
    with start_cache(tmp_path / "srv", state_directory=str(state), log_level="debug") as cache:
        env = signed_env(nix_client, client_dir, cache.public_key)
        store = nix_client.inside(client_dir / "store")
        copy_and_check(
            nix_client, cache.url, env, store, store_fixtures.tree, host_nix_client, nix_daemon_env
        )
        nar_size = closure_nar_size(host_nix_client, nix_daemon_env, store_fixtures.tree, store_fixtures.dep)
        sent = nar_bytes_sent(cache, nars=2)
        assert 0 < sent < nar_size / 2, (sent, nar_size)  # compressed on the wire, decoded by the client
        # the tree's NAR went out as `.nar.zst` (the dependency is too small to be worth compressing)
        assert [m["status"] for m in access_log(cache, ".nar.zst")] == ["200"], cache.log
        deadline = time.monotonic() + 10
        while "compressed copies disabled for now" not in cache.log:
            assert time.monotonic() < deadline, cache.log
            time.sleep(0.1)
        assert cache.log.count("compressed copies disabled for now") == 1, cache.log


def test_content_encoding_from_the_compressed_copy(
    nix_client: NixClient,
    store_fixtures: Fixtures,
    client_dir: Path,
    tmp_path: Path,
    host_nix_client: NixClient,
    nix_daemon_env: dict[str, str],
) -> None:
    """The client's narinfo names the plain NAR (cached while the cache ran without compression, which
    was then turned on); the NAR comes from the copy: `Content-Encoding: zstd` for a client asking for
    it, the NAR itself for one that does not."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bind = f"127.0.0.1:{port}"
    env = signed_env(nix_client, client_dir, "")
    path = store_fixtures.tree
    with start_cache(tmp_path / "srv", bind=bind, enable_compression=False) as cache:
        env = signed_env(nix_client, client_dir, cache.public_key)
        # the client caches the narinfo with the URL of the plain NAR
        cached = nix_client.path_info(path, env, store=cache.url)
        assert cached["url"].startswith("nar/") and ".nar.zst" not in cached["url"], cached
    with start_cache(tmp_path / "srv", bind=bind, zstd={"level": 3}, log_level="debug") as cache:
        store = nix_client.inside(client_dir / "store")
        wait_for_compressed_copy(cache, path)
        # the client re-reads nothing: its narinfo cache still names the plain NAR
        copy_and_check(nix_client, cache.url, env, store, path, host_nix_client, nix_daemon_env)
        nars = access_log(cache, "/nar/")
        assert nars and all(".nar.zst" not in m["path"] for m in nars), cache.log
        nar_size = closure_nar_size(host_nix_client, nix_daemon_env, path, store_fixtures.dep)
        if WANTS_ZSTD[nix_client.name]:
            assert nar_bytes_sent(cache, nars=2) < nar_size / 2
        else:
            assert nar_bytes_sent(cache, nars=2) == nar_size


def test_nar_zst_url(
    nix_client: NixClient,
    store_fixtures: Fixtures,
    client_dir: Path,
    tmp_path: Path,
    host_nix_client: NixClient,
    nix_daemon_env: dict[str, str],
) -> None:
    """Once the copy exists the narinfo names `nar/<hash>.nar.zst`: both clients decode it themselves."""
    with start_cache(tmp_path / "srv", zstd={"level": 3}, log_level="debug") as cache:
        url = wait_for_compressed_copy(cache, store_fixtures.tree)
        assert url.endswith(".nar.zst") or ".nar.zst?" in url
        env = signed_env(nix_client, client_dir, cache.public_key)
        store = nix_client.inside(client_dir / "store")
        copy_and_check(
            nix_client, cache.url, env, store, store_fixtures.tree, host_nix_client, nix_daemon_env
        )
        zst = access_log(cache, ".nar.zst")
        assert [m["status"] for m in zst if m["method"] == "GET"] == ["200"], cache.log
        response = httpx.get(f"{cache.url}/{url}", headers={"accept-encoding": "zstd"}, timeout=10)
        assert response.status_code == 200
        assert "content-encoding" not in response.headers  # the file is the representation
        assert response.headers["accept-ranges"] == "bytes"


RESUME_CONFIGS: dict[str, dict[str, Any]] = {
    "nar": {"enable_compression": False},
    "nar.zst": {"zstd": {"level": 3}},
    # the daemon streams the NAR (NarFromPath): a resumed range skips the bytes already sent
    "daemon-nar": {"store_backend": "daemon", "nar_source": "daemon", "enable_compression": False},
}


@pytest.mark.parametrize("served", list(RESUME_CONFIGS))
def test_resume_after_a_cut_download(
    nix_client: NixClient,
    served: str,
    store_fixtures: Fixtures,
    client_dir: Path,
    tmp_path: Path,
    host_nix_client: NixClient,
    nix_daemon_env: dict[str, str],
) -> None:
    """The link drops in the middle of the NAR the narinfo names (the plain NAR from a file or from the
    daemon, or its `.nar.zst` copy): the client resumes with `Range` (each response carries
    `Accept-Ranges` and no `Content-Encoding`) and gets the right bytes."""
    path = store_fixtures.tree
    with start_cache(tmp_path / "srv", **RESUME_CONFIGS[served]) as cache:
        if served == "nar.zst":
            wait_for_compressed_copy(cache, path)
        narinfo = httpx.get(f"{cache.url}/{Path(path).name[:32]}.narinfo", timeout=10).text
        fields = dict(line.split(": ", 1) for line in narinfo.splitlines())
        assert fields["URL"].split("?")[0].endswith(".nar.zst" if served == "nar.zst" else ".nar"), fields
        file_size = int(fields.get("FileSize", fields["NarSize"]))
        cut_after = 1024 + file_size // 2  # the head and about half of the body
        with cutting_proxy(cache.hostport, cut_path="/" + fields["URL"], cut_after=cut_after) as proxy:
            env = signed_env(nix_client, client_dir, cache.public_key)
            store = nix_client.inside(client_dir / "store")
            copy_and_check(nix_client, proxy.url, env, store, path, host_nix_client, nix_daemon_env)
            assert proxy.cut.is_set()
            asked = proxy.requests_for("/" + fields["URL"])
        assert len(asked) == 2, asked  # one cut, one resumed
        assert header(asked[0], "range") is None
        resumed = header(asked[1], "range")
        assert resumed is not None, asked[1]
        start = re.fullmatch(r"bytes=(\d+)-", resumed)
        assert start is not None and 0 < int(start.group(1)) <= cut_after, resumed


def test_a_cut_zstd_stream_is_not_resumed_by_nix_2_26(
    trixie_nix_client: NixClient,
    store_fixtures: Fixtures,
    tmp_path: Path,
    host_nix_client: NixClient,
    nix_daemon_env: dict[str, str],
) -> None:
    """What a current Nix does with a cut live zstd stream (the `.nar.zst` URL before its copy exists:
    no length, no `Accept-Ranges`; NARs over 256 KiB — smaller ones are compressed whole and have both):
    no resume, no retry — that copy fails. Nothing is lost: the next attempt copies the path. The
    `.nar.zst` copy, once made, resumes (above)."""
    client = trixie_nix_client
    directory = client.root / "tmp" / f"harmonia-test-cut-{tmp_path.name}"
    directory.mkdir(parents=True)
    try:
        state = tmp_path / "state"
        state.mkdir()
        (state / "nar-zstd").write_text("not a directory")  # live streams only
        path = store_fixtures.big
        with start_cache(tmp_path / "srv", state_directory=str(state)) as cache:
            narinfo = httpx.get(f"{cache.url}/{Path(path).name[:32]}.narinfo", timeout=10).text
            url = next(line[5:] for line in narinfo.splitlines() if line.startswith("URL: "))
            env = signed_env(client, directory, cache.public_key)
            store = client.inside(directory / "store")
            with cutting_proxy(cache.hostport, cut_path="/" + url, cut_after=1024 + 8000) as proxy:
                cut = client.run(
                    ["nix", "copy", "--from", proxy.url, "--to", store, path], env=env, check=False
                )
                assert proxy.cut.is_set()
                asked = proxy.requests_for("/" + url)
                assert cut.returncode != 0
                assert re.search(r"partial file|zstd", cut.stderr), cut.stderr
                assert len(asked) == 1 and "zstd" in (header(asked[0], "accept-encoding") or ""), asked
                # the link is back: the same client copies the path
                copy_and_check(client, proxy.url, env, store, path, host_nix_client, nix_daemon_env)
    finally:
        remove_tree(directory)


def tls_cert(directory: Path) -> tuple[Path, Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    directory.mkdir(parents=True, exist_ok=True)
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return ca_file, cert_file, key_file


def test_http2_over_tls(
    nix_client: NixClient,
    store_fixtures: Fixtures,
    client_dir: Path,
    tmp_path: Path,
    host_nix_client: NixClient,
    nix_daemon_env: dict[str, str],
) -> None:
    """Our own TLS listener (ALPN h2, http/1.1): both clients negotiate HTTP/2 and copy over it;
    the server's access log says which protocol each request came in on."""
    ca_file, cert_file, key_file = tls_cert(client_dir / "tls")
    with start_cache(
        tmp_path / "srv", tls_cert_path=str(cert_file), tls_key_path=str(key_file), log_level="debug"
    ) as cache:
        assert cache.url.startswith("https://")
        env = signed_env(
            nix_client, client_dir, cache.public_key, NIX_SSL_CERT_FILE=nix_client.inside(ca_file)
        )
        store = nix_client.inside(client_dir / "store")
        paths = [store_fixtures.tree, store_fixtures.link]
        nix_client.run(["nix", "copy", "--from", cache.url, "--to", store, *paths], env=env)
        for path in (*paths, store_fixtures.dep):
            copied = nix_client.path_info(path, env, store=store)
            assert copied["narHash"] == host_nix_client.path_info(path, nix_daemon_env)["narHash"]
        requests = access_log(cache)
        assert any(".narinfo" in m["path"] for m in requests) and any("/nar/" in m["path"] for m in requests)
        assert {m["proto"] for m in requests} == {"HTTP/2"}, cache.log
        # the check tells the protocols apart: the same client told not to use HTTP/2 shows up as 1.1
        before, nars_before = len(requests), len(access_log(cache, "/nar/"))
        http1 = signed_env(
            nix_client, client_dir / "http1", cache.public_key, NIX_SSL_CERT_FILE=nix_client.inside(ca_file)
        )
        http1["NIX_CONFIG"] += "http2 = false\n"
        nix_client.run(
            ["nix", "copy", "--from", cache.url, "--to", store + "-1", store_fixtures.single], env=http1
        )
        access_log(cache, "/nar/", at_least=nars_before + 1)  # the last request of that copy is logged
        assert {m["proto"] for m in access_log(cache)[before:]} == {"HTTP/1.1"}, cache.log
        # a client without the CA refuses the server
        untrusting = signed_env(nix_client, client_dir / "untrusting", cache.public_key)
        untrusting["NIX_CONFIG"] += "download-attempts = 1\n"  # a TLS failure is retried otherwise
        refused = nix_client.run(
            ["nix", "copy", "--from", cache.url, "--to", store + "-2", store_fixtures.single],
            env=untrusting,
            check=False,
        )
        assert refused.returncode != 0
        assert re.search(r"SSL|certificate", refused.stderr), refused.stderr
