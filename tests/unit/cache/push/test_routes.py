"""The /push routes through the real HTTP/1.1 transport over an in-memory stream, without Nix:
what is answered before `100 Continue`, and what each upload gets. Real Nix and a real daemon
judge the same routes in tests/e2e/cache/test_push.py."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from cache.hashes import nix32_encode
from cache.narinfo import NarInfo, NarLocation, PathInfo, fingerprint
from cache.push.tokens import TokenStore
from cache.signing import SecretKey
from tests.support.push import basic_auth
from tests.support.standin import StandInStore, h1_exchange, make_app

KEY = SecretKey.generate("builder-1")
NAR = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1\x00\x00\x00" + b"pretend" * 100


def app_and_token(tmp_path: Path, **push: object):  # type: ignore[no-untyped-def]
    store = StandInStore(tmp_path / "store")
    store.root.mkdir()
    config = {
        "push_enable": True,
        "push_trusted_keys": (KEY.public_key(),),
        "push_max_nar_bytes": 10_000,
        "daemon_socket": tmp_path / "no-daemon.socket",
    }
    config.update({f"push_{k}": v for k, v in push.items()})
    app = make_app(store, tmp_path, **config)
    token = TokenStore(tmp_path / "state" / "push" / "tokens.json").create("ci")
    return app, token


def put(target: str, body: bytes, auth: str | None, *, expect: bool = True) -> bytes:
    head = f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    if expect:
        head += "Expect: 100-continue\r\n"
    if auth:
        head += f"Authorization: {auth}\r\n"
    return head.encode() + b"\r\n" + body


def statuses(out: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3})", out)]


def nar_target(data: bytes, ext: str = ".nar") -> str:
    return f"/push/nar/{nix32_encode(hashlib.sha256(data).digest())}{ext}"


async def test_no_token_no_continue_no_body(tmp_path: Path) -> None:
    app, _ = app_and_token(tmp_path)
    for auth in (None, basic_auth("hcp_wrong"), "Bearer x"):
        out = await h1_exchange(app.handle, put(nar_target(NAR), NAR, auth), metrics=app.metrics)
        assert statuses(out) == [401], out
        assert b"push token" in out and b'WWW-Authenticate: Basic realm="harmonia push"' in out
    metrics = app.metrics.render()
    assert "harmonia_push_bytes_received_total 0" in metrics
    assert 'harmonia_push_total{outcome="unauthorized"} 3' in metrics


async def test_too_large_before_the_body(tmp_path: Path) -> None:
    app, token = app_and_token(tmp_path)
    big = b"x" * 10_001
    out = await h1_exchange(app.handle, put(nar_target(big), big, basic_auth(token)), metrics=app.metrics)
    assert statuses(out) == [413] and b"at most 10000" in out
    assert "harmonia_push_bytes_received_total 0" in app.metrics.render()


async def test_nar_upload_after_continue_then_head(tmp_path: Path) -> None:
    app, token = app_and_token(tmp_path)
    target = nar_target(NAR)
    raw = put(target, NAR, basic_auth(token))
    head = f"HEAD {target} HTTP/1.1\r\nHost: x\r\nAuthorization: {basic_auth(token)}\r\nConnection: close\r\n\r\n"
    out = await h1_exchange(app.handle, raw + head.encode(), metrics=app.metrics)
    assert statuses(out) == [100, 200, 200], out
    assert f"harmonia_push_bytes_received_total {len(NAR)}" in app.metrics.render()


async def test_absent_nar_head_is_404_never_400(tmp_path: Path) -> None:
    app, token = app_and_token(tmp_path)
    raw = b"".join(
        f"HEAD /push/nar/{'0' * 52}{ext} HTTP/1.1\r\nHost: x\r\nAuthorization: {basic_auth(token)}\r\n\r\n".encode()
        for ext in (".nar", ".nar.zst", ".nar.xz")
    )
    raw += f"HEAD /push/nar/not-a-name.nar HTTP/1.1\r\nHost: x\r\nAuthorization: {basic_auth(token)}\r\n\r\n".encode()
    out = await h1_exchange(app.handle, raw, metrics=app.metrics)
    assert statuses(out) == [404, 404, 404, 404]


async def test_nix_cache_info_needs_no_token(tmp_path: Path) -> None:
    app, _ = app_and_token(tmp_path)
    out = await h1_exchange(app.handle, b"GET /push/nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n")
    assert statuses(out) == [200] and b"StoreDir: /nix/store" in out


async def test_wrong_hash_is_400(tmp_path: Path) -> None:
    app, token = app_and_token(tmp_path)
    target = nar_target(NAR + b"x")
    out = await h1_exchange(app.handle, put(target, NAR, basic_auth(token)), metrics=app.metrics)
    assert statuses(out) == [100, 400] and b"changed on the way" in out


def narinfo_for(data: bytes, key: SecretKey | None) -> tuple[str, bytes]:
    hash_part = "0" * 31 + "1"
    info = PathInfo(f"/nix/store/{hash_part}-x", hashlib.sha256(data).digest(), len(data))
    sigs = (key.signer().sign(fingerprint(info)),) if key else ()
    file = f"nar/{nix32_encode(hashlib.sha256(data).digest())}.nar"
    return hash_part, NarInfo(info, NarLocation(file, "none"), sigs).render().encode()


async def test_narinfo_refusals(tmp_path: Path) -> None:
    app, token = app_and_token(tmp_path)
    auth = basic_auth(token)
    hash_part, unsigned = narinfo_for(NAR, None)
    out = await h1_exchange(
        app.handle, put(f"/push/{hash_part}.narinfo", unsigned, auth), metrics=app.metrics
    )
    assert statuses(out) == [100, 403] and b"sign it with one of these keys: builder-1" in out
    _, stranger = narinfo_for(NAR, SecretKey.generate("stranger-1"))
    out = await h1_exchange(
        app.handle, put(f"/push/{hash_part}.narinfo", stranger, auth), metrics=app.metrics
    )
    assert statuses(out) == [100, 403] and b"signed by stranger-1, expected one of: builder-1" in out
    out = await h1_exchange(app.handle, put(f"/push/{'2' * 32}.narinfo", unsigned, auth), metrics=app.metrics)
    assert statuses(out) == [100, 400] and b"does not match" in out
    # signed, but the cache's daemon is not there: 424, never a 5xx
    _, signed = narinfo_for(NAR, KEY)
    out = await h1_exchange(app.handle, put(f"/push/{hash_part}.narinfo", signed, auth), metrics=app.metrics)
    assert statuses(out) == [100, 424] and b"not your upload's fault" in out
    metrics = app.metrics.render()
    assert 'harmonia_push_total{outcome="bad_signature"} 2' in metrics
    assert 'harmonia_push_total{outcome="daemon_failed"} 1' in metrics


async def test_side_files_are_accepted(tmp_path: Path) -> None:
    app, token = app_and_token(tmp_path)
    auth = basic_auth(token)
    for target in (
        f"/push/{'0' * 32}.ls",
        f"/push/realisations/sha256:{'0' * 52}!out.doi",
        "/push/debuginfo/x",
    ):
        out = await h1_exchange(app.handle, put(target, b"{}", auth), metrics=app.metrics)
        assert statuses(out) == [100, 200], target
    out = await h1_exchange(app.handle, put("/push/unknown", b"{}", auth), metrics=app.metrics)
    assert statuses(out) == [404]


async def test_push_disabled(tmp_path: Path) -> None:
    store = StandInStore(tmp_path / "store")
    store.root.mkdir()
    app = make_app(store, tmp_path)
    out = await h1_exchange(app.handle, put(nar_target(NAR), NAR, None))
    assert statuses(out) == [404] and b"[push] enable = true" in out
