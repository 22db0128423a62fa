"""The routes against a stand-in store (no Nix): status codes, bodies, ranges, and one pass
through the real HTTP/1.1 transport. Real Nix judges the same routes in tests/e2e/cache/."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import trio
import trio.testing

from cache.app import METADATA_TTL, App
from cache.hashes import nix32_encode
from cache.nar import nar_bytes
from cache.narinfo import PathInfo
from cache.transport.messages import Request, Response
from tests.support.standin import StandInStore, body_bytes, h1_exchange, make_app


def make_tree(root: Path) -> None:
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "a.txt").write_text("hello\n")
    (root / "dir" / "index.html").write_text("<p>index</p>")
    (root / "bin").mkdir()
    (root / "bin" / "run").write_text("#!/bin/sh\n")
    os.chmod(root / "bin" / "run", 0o755)
    (root / "link").symlink_to("dir/a.txt")


@pytest.fixture(params=["files", "streamed"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StandInStore:
    store = StandInStore(tmp_path / "store", streamed=request.param == "streamed")
    store.root.mkdir()
    return store


def get(path: str, **headers: str) -> Request:
    raw, _, query = path.partition("?")
    return Request("GET", raw, query, {k.replace("_", "-"): v for k, v in headers.items()})


def hash_part(info: PathInfo) -> str:
    return os.path.basename(info.path)[:32]


def nar_url(info: PathInfo) -> str:
    return f"/nar/{nix32_encode(info.nar_hash)}.nar?hash={hash_part(info)}"


async def answer(store: StandInStore, tmp_path: Path, request: Request) -> tuple[Response, bytes]:
    app = make_app(store, tmp_path)
    resp = await app.handle(request)
    return resp, await body_bytes(resp)


async def test_narinfo(store: StandInStore, tmp_path: Path) -> None:
    info = store.add("tree", make_tree)
    resp, body = await answer(store, tmp_path, get(f"/{hash_part(info)}.narinfo"))
    assert resp.status == 200 and resp.route == "narinfo"
    text = body.decode()
    assert f"StorePath: {info.path}\n" in text
    assert f"NarSize: {info.nar_size}\n" in text
    assert f"URL: nar/{nix32_encode(info.nar_hash)}.nar?hash={hash_part(info)}\n" in text
    resp, body = await answer(store, tmp_path, get(f"/{hash_part(info)}.narinfo?json"))
    assert json.loads(body)["narSize"] == info.nar_size
    resp, _ = await answer(store, tmp_path, get("/" + "0" * 32 + ".narinfo"))
    assert resp.status == 404
    resp, _ = await answer(store, tmp_path, get("/short.narinfo"))
    assert resp.status == 400


async def test_nar_whole_and_ranges(store: StandInStore, tmp_path: Path) -> None:
    info = store.add("tree", make_tree)
    whole = nar_bytes(store.real_path(info.path))
    resp, body = await answer(store, tmp_path, get(nar_url(info)))
    assert resp.status == 200 and body == whole and resp.content_length == len(whole)
    resp, body = await answer(store, tmp_path, get(nar_url(info), range="bytes=10-99"))
    assert resp.status == 206 and body == whole[10:100]
    assert resp.header("content-range") == f"bytes 10-99/{len(whole)}"
    resp, body = await answer(store, tmp_path, get(nar_url(info), range="bytes=-7"))
    assert resp.status == 206 and body == whole[-7:]
    resp, _ = await answer(store, tmp_path, get(nar_url(info), range=f"bytes={len(whole)}-"))
    assert resp.status == 416 and resp.header("content-range") == f"bytes */{len(whole)}"
    wrong = f"/nar/{'0' * 52}.nar?hash={hash_part(info)}"
    resp, _ = await answer(store, tmp_path, get(wrong))
    assert resp.status == 404  # another NAR hash than the path's: never the wrong bytes


async def test_serve_and_listing(store: StandInStore, tmp_path: Path) -> None:
    info = store.add("tree", make_tree)
    base = f"/serve/{hash_part(info)}"
    resp, body = await answer(store, tmp_path, get(base + "/dir/a.txt"))
    assert resp.status == 200 and body == b"hello\n"
    resp, body = await answer(store, tmp_path, get(base + "/dir/a.txt", range="bytes=1-2"))
    assert resp.status == 206 and body == b"el"
    resp, body = await answer(store, tmp_path, get(base + "/link"))
    assert resp.status == 200 and body == b"hello\n"
    resp, body = await answer(store, tmp_path, get(base + "/dir/"))
    assert resp.status == 200 and body == b"<p>index</p>"
    resp, _ = await answer(store, tmp_path, get(base + "/dir"))
    assert resp.status == 301
    resp, _ = await answer(store, tmp_path, get(base + "/../x"))
    assert resp.status == 400
    resp, body = await answer(store, tmp_path, get(f"/{hash_part(info)}.ls"))
    assert resp.status == 200 and "a.txt" in json.loads(body)["root"]["entries"]["dir"]["entries"]


async def test_methods_and_unknown_paths(store: StandInStore, tmp_path: Path) -> None:
    app = make_app(store, tmp_path)
    resp = await app.handle(Request("PUT", "/x.narinfo", "", {}))
    assert resp.status == 405 and resp.header("allow") == "GET, HEAD"
    resp = await app.handle(get("/nope/nope"))
    assert resp.status == 404
    resp = await app.handle(get("/nix-cache-info"))
    assert resp.status == 200 and b"StoreDir: /nix/store" in await body_bytes(resp)


async def test_through_the_http1_transport(store: StandInStore, tmp_path: Path) -> None:
    info = store.add("tree", make_tree)
    app = make_app(store, tmp_path)
    raw = (
        f"GET /{hash_part(info)}.narinfo HTTP/1.1\r\nHost: x\r\n\r\n"
        f"GET {nar_url(info)} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    ).encode()
    out = await h1_exchange(app.handle, raw, metrics=app.metrics)
    assert out.count(b"HTTP/1.1 200 OK") == 2
    assert out.endswith(nar_bytes(store.real_path(info.path)))
    assert 'harmonia_requests_total{route="nar",status="200"} 1' in app.metrics.render()


async def test_small_nars_are_one_body_in_memory_and_large_ones_segments(tmp_path: Path) -> None:
    from cache.routes.nar import INLINE_MAX
    from cache.transport.messages import SegmentsBody

    store = StandInStore(tmp_path / "store")
    store.root.mkdir()
    small = store.add("small", make_tree)
    large = store.add("large", lambda root: root.write_bytes(os.urandom(INLINE_MAX + 1)))
    resp, body = await answer(store, tmp_path, get(nar_url(small)))
    # read whole before the status line: one write for head and body, no thread hop per file
    assert isinstance(resp.body, bytes) and body == nar_bytes(store.real_path(small.path))
    resp, body = await answer(store, tmp_path, get(nar_url(small), range="bytes=3-9"))
    assert resp.status == 206 and body == nar_bytes(store.real_path(small.path))[3:10]
    resp, body = await answer(store, tmp_path, get(nar_url(large)))
    assert isinstance(resp.body, SegmentsBody)  # sendfile for the file's contents
    assert body == nar_bytes(store.real_path(large.path))


async def test_a_small_path_changed_since_its_metadata_is_never_sent_whole(tmp_path: Path) -> None:
    # a file that grew: the in-memory read sees another length and leaves it to the segment
    # path, whose length check in the transport cuts the body (tests/unit/cache/transport)
    store = StandInStore(tmp_path / "store")
    store.root.mkdir()
    info = store.add("tree", make_tree)
    (Path(os.fsdecode(store.real_path(info.path))) / "dir" / "a.txt").write_text("hello, grown\n")
    resp = await make_app(store, tmp_path).handle(get(nar_url(info)))
    assert not isinstance(resp.body, bytes)
    assert resp.content_length == info.nar_size != len(await body_bytes(resp))


async def test_small_nars_are_kept_in_memory_but_a_collected_path_is_a_404_at_once(tmp_path: Path) -> None:
    store = StandInStore(tmp_path / "store")
    store.root.mkdir()
    info = store.add("tree", make_tree)
    app = make_app(store, tmp_path)
    whole = nar_bytes(store.real_path(info.path))
    assert await body_bytes(await app.handle(get(nar_url(info)))) == whole
    assert app.bodies.get(info.nar_hash, "none") == whole
    # served from memory now: the files are not read again (a path changed in place shows it)
    (Path(os.fsdecode(store.real_path(info.path))) / "dir" / "a.txt").write_text("HELLO\n")
    assert await body_bytes(await app.handle(get(nar_url(info)))) == whole
    # but the path's validity is checked first, on every request
    shutil.rmtree(os.fsdecode(store.real_path(info.path)))
    assert (await app.handle(get(nar_url(info)))).status == 404


async def test_the_look_ahead_prepares_the_next_levels_narinfo_and_small_nar(tmp_path: Path) -> None:
    store = StandInStore(tmp_path / "store")
    store.root.mkdir()
    dep = store.add("dep", make_tree)
    top = store.add("top", lambda root: root.write_text("top\n"), references=(dep.path,))
    app = make_app(store, tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(app.run_background)
        assert (await app.handle(get(f"/{hash_part(top)}.narinfo"))).status == 200
        with trio.fail_after(5):
            await trio.testing.wait_all_tasks_blocked()  # the look-ahead has done its work
        assert app.bodies.get(dep.nar_hash, "none") == nar_bytes(store.real_path(dep.path))
        asked = store.queries
        resp, body = await answer_with(app, get(f"/{hash_part(dep)}.narinfo"))
        assert resp.status == 200 and f"StorePath: {dep.path}\n" in body.decode()
        assert store.queries == asked  # answered from what the look-ahead fetched
        nursery.cancel_scope.cancel()


async def answer_with(app: App, request: Request) -> tuple[Response, bytes]:
    resp = await app.handle(request)
    return resp, await body_bytes(resp)


async def test_metadata_is_asked_again_for_narinfos_but_not_for_contents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past METADATA_TTL a narinfo asks the store again (a signature added since shows); a NAR,
    a listing or a file is the path's contents, which the `lstat` check vouches for."""
    store = StandInStore(tmp_path / "store")
    store.root.mkdir()
    info = store.add("tree", make_tree)
    app = make_app(store, tmp_path)
    now = [1000.0]
    monkeypatch.setattr("cache.app.time.monotonic", lambda: now[0])
    assert (await app.handle(get(f"/{hash_part(info)}.narinfo"))).status == 200
    now[0] += METADATA_TTL + 1
    asked = store.queries
    for url in (nar_url(info), f"/{hash_part(info)}.ls", f"/serve/{hash_part(info)}/dir/a.txt"):
        assert (await app.handle(get(url))).status == 200, url
    assert store.queries == asked
    assert (await app.handle(get(f"/{hash_part(info)}.narinfo"))).status == 200
    assert store.queries > asked
    # a collected path is still a 404 at once for its contents
    shutil.rmtree(os.fsdecode(store.real_path(info.path)))
    assert (await app.handle(get(nar_url(info)))).status == 404
