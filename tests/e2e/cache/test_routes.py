"""Every route over HTTP against the real store: ranges, listings, /serve, logs, HTTP/2, GC."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import zstandard

from tests.support.cache_server import CacheServer, start_cache
from tests.support.fixtures import Fixtures, unique_path_expr
from tests.support.nix import build, dump, run

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, nix_daemon_env: dict[str, str]) -> Iterator[CacheServer]:
    with start_cache(tmp_path_factory.mktemp("routes"), priority=60, zstd={"level": 3}) as srv:
        yield srv


@pytest.fixture
def client(server: CacheServer) -> Iterator[httpx.Client]:
    # like Nix 2.8: no content coding unless a test asks for it
    with httpx.Client(base_url=server.url, timeout=60, headers={"Accept-Encoding": "identity"}) as c:
        yield c


def nar_url(client: httpx.Client, path: str) -> str:
    """The uncompressed NAR's URL (the narinfo may point at the compressed copy by now)."""
    hash_part = Path(path).name[:32]
    text = client.get(f"/{hash_part}.narinfo").text
    narhash = next(line for line in text.splitlines() if line.startswith("NarHash: "))
    return f"/nar/{narhash.removeprefix('NarHash: sha256:')}.nar?hash={hash_part}"


def test_head_matches_get(client: httpx.Client, store_fixtures: Fixtures) -> None:
    narinfo = f"/{Path(store_fixtures.tree).name[:32]}.narinfo"
    # the first narinfo request starts a compressed copy, which then adds FileHash/FileSize: let it settle
    deadline = time.monotonic() + 60
    while "FileSize: " not in client.get(narinfo).text:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    for url in ["/nix-cache-info", narinfo, nar_url(client, store_fixtures.tree)]:
        get, head = client.get(url), client.head(url)
        assert head.status_code == get.status_code == 200
        assert head.content == b""
        assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.content))
        assert head.headers["content-type"] == get.headers["content-type"]


def test_narinfo_json_and_cache_control(client: httpx.Client, store_fixtures: Fixtures) -> None:
    hash_part = Path(store_fixtures.tree).name[:32]
    resp = client.get(f"/{hash_part}.narinfo?json")
    doc = json.loads(resp.text)
    assert doc["path"] == store_fixtures.tree
    assert store_fixtures.dep in doc["references"]
    assert "max-age" in client.get(f"/{hash_part}.narinfo").headers["cache-control"]
    missing = client.get("/" + "0" * 32 + ".narinfo")
    assert missing.status_code == 404
    assert missing.headers["cache-control"] == "no-store"


def test_legacy_nix_serve_nar_url(
    client: httpx.Client, store_fixtures: Fixtures, nix_daemon_env: dict[str, str]
) -> None:
    url = nar_url(client, store_fixtures.single)
    narhash = url.split("/nar/")[1].split(".nar")[0]
    hash_part = Path(store_fixtures.single).name[:32]
    resp = client.get(f"/nar/{hash_part}-{narhash}.nar")
    assert resp.status_code == 200
    assert resp.content == dump(store_fixtures.single, nix_daemon_env)
    wrong = client.get(f"/nar/{hash_part}-{'0' * 52}.nar")
    assert wrong.status_code == 404


def test_ranges(client: httpx.Client, store_fixtures: Fixtures, nix_daemon_env: dict[str, str]) -> None:
    url = nar_url(client, store_fixtures.tree)
    whole = dump(store_fixtures.tree, nix_daemon_env)
    part = client.get(url, headers={"Range": "bytes=1000-200999"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 1000-200999/{len(whole)}"
    assert part.content == whole[1000:201000]
    tail = client.get(url, headers={"Range": "bytes=-100"})
    assert tail.content == whole[-100:]
    bad = client.get(url, headers={"Range": f"bytes={len(whole)}-"})
    assert bad.status_code == 416
    assert bad.headers["content-range"] == f"bytes */{len(whole)}"
    assert client.get(url).headers["accept-ranges"] == "bytes"


def test_zstd_content_encoding(
    client: httpx.Client, store_fixtures: Fixtures, nix_daemon_env: dict[str, str]
) -> None:
    url = nar_url(client, store_fixtures.tree)
    resp = client.get(url, headers={"Accept-Encoding": "zstd"})
    assert resp.headers["content-encoding"] == "zstd"
    assert "Accept-Encoding" in resp.headers["vary"]
    # httpx decodes zstd itself when zstandard is installed; check the raw bytes too
    assert zstandard.ZstdDecompressor().decompressobj().decompress(_raw(client, url)) == dump(
        store_fixtures.tree, nix_daemon_env
    )
    plain = client.get(url, headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in plain.headers


def _raw(client: httpx.Client, url: str) -> bytes:
    with client.stream("GET", url, headers={"Accept-Encoding": "zstd"}) as resp:
        return b"".join(resp.iter_raw())


def _fields(text: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in text.splitlines())


def test_compressed_from_the_first_narinfo_and_the_same_bytes_ever_after(
    tmp_path: Path, store_fixtures: Fixtures, nix_daemon_env: dict[str, str]
) -> None:
    """The first narinfo already says zstd; its URL never changes; the live stream before the
    copy, the copy, and the live stream after the copy was evicted are the same bytes, and once a
    copy was made FileHash/FileSize are added (and stay true)."""
    import hashlib

    from cache.hashes import sha256_nix32

    big = store_fixtures.big
    hash_part = Path(big).name[:32]
    with (
        start_cache(tmp_path, zstd={"level": 3}) as srv,
        httpx.Client(base_url=srv.url, timeout=120, headers={"Accept-Encoding": "identity"}) as c,
    ):
        first = _fields(c.get(f"/{hash_part}.narinfo").text)
        assert first["Compression"] == "zstd"
        assert first["URL"].startswith("nar/") and ".nar.zst?hash=" in first["URL"]
        live = c.get("/" + first["URL"]).content  # most likely before the copy exists
        assert zstandard.ZstdDecompressor().decompressobj().decompress(live) == dump(big, nix_daemon_env)
        deadline = time.monotonic() + 120
        while "FileHash" not in (text := c.get(f"/{hash_part}.narinfo").text):
            assert time.monotonic() < deadline, "no compressed copy after 120 s"
            time.sleep(0.3)
        later = _fields(text)
        assert later["URL"] == first["URL"]
        assert {k: v for k, v in later.items() if k not in ("FileHash", "FileSize")} == first
        copy = c.get("/" + later["URL"])
        assert copy.headers["accept-ranges"] == "bytes"
        assert copy.content == live
        assert len(copy.content) == int(later["FileSize"]) < 0.5 * int(later["NarSize"])
        assert sha256_nix32(hashlib.sha256(copy.content).digest()) == later["FileHash"]
        part = c.get("/" + later["URL"], headers={"Range": "bytes=10-19"})
        assert part.status_code == 206
        assert part.content == live[10:20]
        # evicted (as by the size cap): the narinfo keeps its facts, the stream its bytes
        narhash = first["NarHash"].removeprefix("sha256:")
        (tmp_path / "state" / "nar-zstd" / f"{narhash}.nar.zst").unlink()
        assert _fields(c.get(f"/{hash_part}.narinfo").text) == later
        again = c.get("/" + later["URL"])
        assert again.headers["content-length"] == later["FileSize"]
        assert again.content == live


def test_small_nars_are_compressed_in_memory_without_copies(
    tmp_path: Path, nix_daemon_env: dict[str, str]
) -> None:
    """A NAR up to COPYLESS_MAX is offered compressed but never gets a copy on disk: every worker
    compresses it in memory, to the bytes a copy would hold, so its narinfo never needs
    FileHash/FileSize. A larger one, built alongside, still gets its copy. Both built while the
    cache runs (learnt at registration) and before it started (learnt when asked for); the copy
    an earlier version made of the older one is removed when the compressor first starts."""
    import hashlib
    import os

    from cache.compression import COPYLESS_MAX, MIN_COMPRESS_SIZE, CopyStore, compress_chunks
    from cache.nar import nar_segments
    from tests.support.fixtures import _MK

    def built(tag: str, numbers: int) -> str:
        expr = "let" + _MK + f'in mk "hc-{tag}-{time.time_ns()}" "/usr/bin/seq 1 {numbers} > $out" {{}}'
        return build(expr, nix_daemon_env)[0]

    older = built("small-older", 1500)  # about 6.4 KiB
    # the copy an earlier version made of it: swept when the compressor first starts
    seeded = CopyStore(tmp_path / "state" / "nar-zstd", 3, 1 << 30).build(
        hashlib.sha256(dump(older, nix_daemon_env)).digest(), lambda: nar_segments(os.fsencode(older))
    )
    assert seeded is not None
    with (
        start_cache(tmp_path, workers=2, zstd={"level": 3}) as srv,
        httpx.Client(base_url=srv.url, timeout=60, headers={"Accept-Encoding": "identity"}) as c,
    ):
        small, larger = built("small-newer", 1500), built("larger-newer", 20000)  # 6.4 and 108 KiB
        copies = tmp_path / "state" / "nar-zstd"
        deadline = time.monotonic() + 60
        while True:  # the larger path's copy, made as it was registered
            fields = _fields(c.get(f"/{Path(larger).name[:32]}.narinfo").text)
            if "FileHash" in fields:
                break
            assert time.monotonic() < deadline, "no copy of the larger path after 60 s"
            time.sleep(0.2)
        assert int(fields["NarSize"]) > COPYLESS_MAX
        for path in (older, small):
            nar = dump(path, nix_daemon_env)
            assert MIN_COMPRESS_SIZE <= len(nar) <= COPYLESS_MAX
            expected = b"".join(compress_chunks(iter([nar]), 3))
            for _ in range(4):  # whichever worker answers
                fields = _fields(c.get(f"/{Path(path).name[:32]}.narinfo").text)
                assert fields["Compression"] == "zstd" and ".nar.zst?hash=" in fields["URL"]
                assert "FileHash" not in fields and "FileSize" not in fields
                body = c.get("/" + fields["URL"])
                assert body.status_code == 200 and body.content == expected
                assert body.headers["content-length"] == str(len(expected))
                assert c.get("/" + fields["URL"], headers={"Range": "bytes=4-9"}).content == expected[4:10]
            # a client that asks for the plain NAR with Accept-Encoding gets the same bytes as coding
            plain = "/" + fields["URL"].replace(".nar.zst", ".nar")
            with c.stream("GET", plain, headers={"Accept-Encoding": "zstd"}) as coded:
                assert coded.headers["content-encoding"] == "zstd"
                assert b"".join(coded.iter_raw()) == expected
        time.sleep(1)  # nor is a copy queued behind the answers, and the older copy was swept
        assert not seeded.path.exists()
        for path in (older, small):
            narhash = _fields(c.get(f"/{Path(path).name[:32]}.narinfo").text)["NarHash"]
            assert not list(copies.glob(f"{narhash.removeprefix('sha256:')}.*"))
        assert list(copies.glob("*.meta"))  # the larger path's


def test_listing(client: httpx.Client, store_fixtures: Fixtures, nix_daemon_env: dict[str, str]) -> None:
    resp = client.get(f"/{Path(store_fixtures.tree).name[:32]}.ls")
    assert resp.status_code == 200
    doc = resp.json()
    nar = dump(store_fixtures.tree, nix_daemon_env)
    node = doc["root"]["entries"]["bin"]["entries"]["run"]
    assert node["executable"] is True
    assert nar[node["narOffset"] : node["narOffset"] + node["size"]] == b"#!/bin/sh\necho hi\n"
    assert doc["root"]["entries"]["dangling"] == {"type": "symlink", "target": "/nonexistent/dangling"}


def test_serve_browses_without_escaping(client: httpx.Client, store_fixtures: Fixtures) -> None:
    h = Path(store_fixtures.tree).name[:32]
    assert client.get(f"/serve/{h}/bin/run").content == b"#!/bin/sh\necho hi\n"
    assert client.get(f"/serve/{h}/dir/").content == b"<html>index</html>"
    assert client.get(f"/serve/{h}/dir").status_code == 301
    listing = client.get(f"/serve/{h}/order/")
    assert listing.status_code == 200 and "a.b" in listing.text
    assert client.get(f"/serve/{h}/dir/rel-link").status_code == 200  # ../empty-file, inside
    assert client.get(f"/serve/{h}/dir-link/one-byte").content == b"x"
    moved = client.get(f"/serve/{h}/abs-link")
    assert moved.status_code == 302
    assert moved.headers["location"] == f"/serve/{Path(store_fixtures.dep).name[:32]}/file"
    assert client.get(f"/serve/{h}/dangling").status_code == 404
    assert client.get(f"/serve/{h}/dir/ünïcödé-файл-名前").content == b"unicode\n"
    assert client.get(f"/serve/{h}/dir/zeros-100k", headers={"Range": "bytes=0-9"}).content == b"\0" * 10


def test_build_log(client: httpx.Client, tmp_path: Path, server: CacheServer) -> None:
    import bz2

    drv_name = "0" * 31 + "1-fake-build.drv"
    log_dir = Path("/nix/var/log/nix/drvs") / drv_name[:2]
    log_dir.mkdir(parents=True, exist_ok=True)
    target = log_dir / (drv_name[2:] + ".bz2")
    target.write_bytes(bz2.compress(b"building...\ndone\n"))
    try:
        resp = client.get(f"/log/{drv_name}")
        assert resp.status_code == 200
        assert resp.content == b"building...\ndone\n"
        packed = client.get(f"/log/{drv_name}", headers={"Accept-Encoding": "bzip2"})
        assert packed.headers.get("content-encoding") == "bzip2"
        assert client.get("/log/" + "0" * 32 + "-nothing.drv").status_code == 404
        assert client.get("/log/..%2F..%2Fetc%2Fpasswd").status_code in (400, 404)
    finally:
        target.unlink()


def test_http2_prior_knowledge(
    server: CacheServer, store_fixtures: Fixtures, nix_daemon_env: dict[str, str]
) -> None:
    with httpx.Client(
        base_url=server.url, http1=False, http2=True, timeout=60, headers={"Accept-Encoding": "identity"}
    ) as h2:
        resp = h2.get("/nix-cache-info")
        assert resp.http_version == "HTTP/2"
        assert "Priority: 60" in resp.text
        url = nar_url(h2, store_fixtures.tree)
        assert h2.get(url).content == dump(store_fixtures.tree, nix_daemon_env)


def test_collected_path_is_404_not_truncated(client: httpx.Client, nix_daemon_env: dict[str, str]) -> None:
    path = build(unique_path_expr(f"gc-{time.time_ns()}"), nix_daemon_env)[0]
    url = nar_url(client, path)
    run(["nix-store", "--delete", path], env=nix_daemon_env)
    assert client.get(url).status_code == 404
    assert client.get(f"/{Path(path).name[:32]}.narinfo").status_code == 404


def test_client_disconnect_mid_nar_frees_everything(
    server: CacheServer, client: httpx.Client, store_fixtures: Fixtures
) -> None:
    url = nar_url(client, store_fixtures.big)
    host, port = server.hostport.rsplit(":", 1)
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    deadline = time.monotonic() + 20
    while "harmonia_nars_in_flight 0" not in client.get("/metrics").text:
        assert time.monotonic() < deadline, "NAR transfers still counted after the clients left"
        time.sleep(0.2)
    assert client.get("/nix-cache-info").status_code == 200


def test_metrics_and_service_routes(client: httpx.Client) -> None:
    client.get("/nix-cache-info")
    text = client.get("/metrics").text
    assert 'harmonia_requests_total{route="nix-cache-info",status="200"}' in text
    assert "harmonia_request_duration_seconds_bucket" in text
    assert client.get("/health").text == "OK\n"
    assert client.get("/version").text.startswith("harmonia-cache ")
    landing = client.get("/")
    assert "test-cache-1:" in landing.text and "trusted-public-keys" in landing.text


def test_evicted_copies_are_never_advertised_or_served_empty(
    tmp_path: Path, store_fixtures: Fixtures, nix_daemon_env: dict[str, str]
) -> None:
    """With a cap smaller than two copies, making one evicts the other: every answer stays whole."""
    small, big = store_fixtures.tree, store_fixtures.big
    with (
        start_cache(tmp_path, compressed_cache_max_bytes=1_000_000) as srv,
        httpx.Client(base_url=srv.url, timeout=60, headers={"Accept-Encoding": "identity"}) as client,
    ):

        def settle(path: str) -> None:
            narinfo = f"/{Path(path).name[:32]}.narinfo"
            deadline = time.monotonic() + 120
            while "FileSize: " not in client.get(narinfo).text:  # a copy was made
                assert time.monotonic() < deadline
                time.sleep(0.1)

        settle(small)
        settle(big)  # its copy alone is over the cap: the small path's copy is evicted
        for path in (small, big):
            fields = dict(
                line.split(": ", 1)
                for line in client.get(f"/{Path(path).name[:32]}.narinfo").text.splitlines()
            )
            resp = client.get("/" + fields["URL"])
            assert resp.status_code == 200
            if fields["Compression"] == "zstd":
                assert len(resp.content) == int(fields["FileSize"])
            else:
                assert len(resp.content) == int(fields["NarSize"])
        # a client that accepts zstd gets the whole NAR whether or not a copy survived
        encoded = _raw(client, nar_url(client, small))
        assert zstandard.ZstdDecompressor().decompressobj().decompress(encoded) == dump(small, nix_daemon_env)


ACCEPT_ENCODINGS = [
    None,  # Nix 2.8
    "zstd, br, gzip, deflate, bzip2, xz",  # Nix 2.14-2.33
    "identity",
    "identity;q=1, *;q=0",
    "*",
    "bzip2",
    "zstd;q=0",
]


def _codings(resp: httpx.Response) -> list[str]:
    return [c.strip().lower() for v in resp.headers.get_list("content-encoding") for c in v.split(",")]


def test_no_response_ever_says_content_encoding_identity(
    server: CacheServer, store_fixtures: Fixtures, tmp_path: Path
) -> None:
    """Nix before 2.31 fails on `Content-Encoding: identity`: every route, status, range and HEAD, over
    HTTP/1.1 and HTTP/2, either names a real coding (zstd for NARs, bzip2 for logs) or none at all."""
    import bz2

    drv_name = "0" * 31 + "2-identity-check.drv"
    log_dir = Path("/nix/var/log/nix/drvs") / drv_name[:2]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / (drv_name[2:] + ".bz2")
    log_file.write_bytes(bz2.compress(b"log\n"))
    tree_hash = Path(store_fixtures.tree).name[:32]
    try:
        with httpx.Client(base_url=server.url, timeout=60) as probe:
            narinfo = f"/{tree_hash}.narinfo"
            deadline = time.monotonic() + 60
            while "Compression: zstd" not in (text := probe.get(narinfo).text):
                assert time.monotonic() < deadline, "no compressed copy after 60 s"
                time.sleep(0.1)
            zst_url = "/" + next(line[5:] for line in text.splitlines() if line.startswith("URL: "))
            plain = nar_url(probe, store_fixtures.tree)
            narhash = plain.split("/nar/")[1].split(".nar")[0]
        ranged = [plain, zst_url, f"/nar/{tree_hash}-{narhash}.nar", f"/serve/{tree_hash}/deep/a/b/c/numbers"]
        urls = [
            *ranged,
            "/",
            "/nix-cache-info",
            "/version",
            "/health",
            "/metrics",
            narinfo,
            narinfo + "?json",
            f"/{tree_hash}.ls",
            f"/log/{drv_name}",
            f"/log/{'0' * 32}-absent.drv",
            f"/serve/{tree_hash}/",
            f"/serve/{tree_hash}/dir/index.html",
            "/" + "0" * 32 + ".narinfo",  # 404
            "/nar/not-a-hash.nar?hash=x",  # 400
            "/nowhere",
        ]
        seen: set[tuple[int, str]] = set()
        for http2 in (False, True):
            with httpx.Client(base_url=server.url, timeout=60, http1=not http2, http2=http2) as client:
                for accept in ACCEPT_ENCODINGS:
                    for url in urls:
                        ranges = (
                            [None, "bytes=0-9", "bytes=5-", "bytes=999999999-"] if url in ranged else [None]
                        )
                        for rng in ranges:
                            headers = {"Accept-Encoding": accept} if accept else {}
                            if rng:
                                headers["Range"] = rng
                            for method in ("GET", "HEAD"):
                                req = client.build_request(method, url, headers=headers)
                                if accept is None:
                                    del req.headers["accept-encoding"]  # none at all, as Nix 2.8
                                resp = client.send(req)
                                assert resp.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
                                assert resp.request.headers.get("accept-encoding") == accept
                                codings = _codings(resp)
                                assert "identity" not in codings, (method, url, accept, rng, resp.headers)
                                assert set(codings) <= {"zstd", "bzip2"}, (url, resp.headers)
                                seen.add((resp.status_code, ",".join(codings)))
            # a client that ruled zstd out never gets it
            with httpx.Client(base_url=server.url, timeout=60, http1=not http2, http2=http2) as client:
                assert "zstd" not in _codings(client.get(plain, headers={"Accept-Encoding": "zstd;q=0"}))
        # the walk covered what it claims: codings, plain answers, ranges and errors
        statuses = {status for status, _ in seen}
        assert {200, 206, 400, 404, 416} <= statuses, seen
        assert (200, "zstd") in seen and (200, "bzip2") in seen and (200, "") in seen, seen
    finally:
        log_file.unlink()
