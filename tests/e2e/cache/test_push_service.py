"""The push service against a real nix-daemon that trusts no user (as the cache's user is).

Paths are made up (a NAR of one file, signed by a test key), so none of them is in the host
store before; each test removes what it imported with `nix-store --delete` (that path only).
"""

from __future__ import annotations

import lzma
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from cache.daemon import DaemonStore
from cache.push.config import PushConfig
from cache.push.service import PushService
from cache.push.upload import NarName, UploadedNarInfo, UploadRefused
from cache.signing import SecretKey
from tests.support.nix import have_nix
from tests.support.push import MadePath, PushDaemon, made_path, untrusting_daemon

pytestmark = pytest.mark.e2e
PUSHER = SecretKey.generate("test-pusher-1")
STRANGER = SecretKey.generate("test-stranger-1")


class Body:
    def __init__(self, data: bytes, chunk: int = 4096) -> None:
        self.length: int | None = len(data)
        self._parts = [data[i : i + chunk] for i in range(0, len(data), chunk)]

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await trio.lowlevel.checkpoint()
        return self._parts.pop(0) if self._parts else b""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PushDaemon]:
    if not have_nix():
        pytest.skip("Nix is not installed")
    with untrusting_daemon(tmp_path_factory.mktemp("push-daemon"), [str(PUSHER.public_key())]) as d:
        yield d


def service(tmp_path: Path, daemon: PushDaemon, **kw: object) -> PushService:
    config = PushConfig(enable=True, trusted_keys=(PUSHER.public_key(),), **kw)  # type: ignore[arg-type]
    return PushService(config, tmp_path / "state", daemon.socket, "/nix/store")


def delete(daemon: PushDaemon, *paths: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nix-store", "--delete", *paths],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def valid(daemon: PushDaemon, path: str) -> bool:
    probe = subprocess.run(
        ["nix-store", "--check-validity", path], env=daemon.env, capture_output=True, timeout=30, check=False
    )
    return probe.returncode == 0


async def upload(svc: PushService, made: MadePath, compression: str = "xz") -> UploadedNarInfo:
    import hashlib

    from cache.hashes import nix32_encode

    body = lzma.compress(made.nar) if compression == "xz" else made.nar
    ext = ".nar.xz" if compression == "xz" else ".nar"
    name = NarName(hashlib.sha256(body).digest(), ext)
    assert nix32_encode(name.file_hash)  # a real nix32 name
    await svc.store_nar(name, Body(body))
    assert svc.pending(name) is not None
    return UploadedNarInfo(made.info, name, compression, len(body))


async def test_import_roots_and_keeps_the_pushers_signature(tmp_path: Path, daemon: PushDaemon) -> None:
    svc = service(tmp_path, daemon)
    dep = made_path(tmp_path, "push-dep", "dependency\n", PUSHER)
    top = made_path(tmp_path, "push-top", f"uses {dep.info.path}\n", PUSHER, (dep.info.path,))
    try:
        with trio.fail_after(60):
            for made in (dep, top):
                up = await upload(svc, made)
                assert await svc.import_path(up) == "imported"
                assert svc.pending(up.nar) is None  # the upload is gone once imported
            # the host store has them, with the pusher's signature, as the cache serves it
            store = DaemonStore(daemon.socket, "/nix/store", "/nix/store")
            info = await store.path_info(top.info.path)
            await store.aclose()
        assert info is not None
        assert info.sigs == top.info.sigs
        assert info.references == (dep.info.path,)
        assert info.nar_hash == top.info.nar_hash
        for made in (dep, top):
            link = svc.roots / made.info.path.rsplit("/", 1)[1]
            assert os.readlink(link) == made.info.path
            assert svc.retained(made.info.path)
        # rooted: the daemon will not delete them
        refused = delete(daemon, dep.info.path)
        assert refused.returncode != 0 and "alive" in refused.stderr
        # a second push of the same path is accepted as it is, and renews the root
        again = await upload(svc, top)
        assert await svc.import_path(again) == "already valid"
    finally:
        for link in svc.roots.iterdir() if svc.roots.exists() else []:
            link.unlink()
        delete(daemon, top.info.path, dep.info.path)


async def test_retention_ends_with_the_sweep(tmp_path: Path, daemon: PushDaemon) -> None:
    svc = service(tmp_path, daemon, retention_days=1 / 86400)  # one second
    made = made_path(tmp_path, "push-short", "short-lived\n", PUSHER)
    try:
        with trio.fail_after(60):
            assert await svc.import_path(await upload(svc, made, "none")) == "imported"
        assert "alive" in delete(daemon, made.info.path).stderr
        assert svc.sweep_once() == 0 or not svc.retained(made.info.path)
        await trio.sleep(1.2)
        assert not svc.retained(made.info.path)
        assert svc.sweep_once() == 1
        assert delete(daemon, made.info.path).returncode == 0
        assert not valid(daemon, made.info.path)
    finally:
        delete(daemon, made.info.path)


async def test_missing_reference_is_409_before_any_import(tmp_path: Path, daemon: PushDaemon) -> None:
    svc = service(tmp_path, daemon)
    absent = made_path(tmp_path, "push-absent", "never pushed\n", PUSHER)
    top = made_path(tmp_path, "push-orphan", "x\n", PUSHER, (absent.info.path,))
    up = await upload(svc, top)
    with pytest.raises(UploadRefused, match=absent.info.path) as exc:
        await svc.import_path(up)
    assert exc.value.status == 409
    assert not valid(daemon, top.info.path)
    assert svc.pending(up.nar) is not None  # kept: pushing the reference and retrying works


async def test_tampered_nar_is_400(tmp_path: Path, daemon: PushDaemon) -> None:
    svc = service(tmp_path, daemon)
    real = made_path(tmp_path, "push-real", "the real bytes\n", PUSHER)
    other = made_path(tmp_path, "push-other", "other bytes!!!!\n", None)
    up = await upload(svc, other)  # the NAR of another path under this narinfo
    with pytest.raises(UploadRefused, match="tampered") as exc:
        await svc.import_path(UploadedNarInfo(real.info, up.nar, up.compression, up.file_size))
    assert exc.value.status == 400
    assert not valid(daemon, real.info.path)


async def test_narinfo_before_its_nar_is_409(tmp_path: Path, daemon: PushDaemon) -> None:
    svc = service(tmp_path, daemon)
    made = made_path(tmp_path, "push-early", "x\n", PUSHER)
    with pytest.raises(UploadRefused, match="has not been uploaded") as exc:
        await svc.import_path(UploadedNarInfo(made.info, NarName(made.info.nar_hash, ".nar"), "none", None))
    assert exc.value.status == 409


async def test_a_key_the_host_does_not_trust_is_424_and_says_so(tmp_path: Path, daemon: PushDaemon) -> None:
    # [push] trusts STRANGER, but the host's daemon does not: the operator's mistake, not the pusher's
    config = PushConfig(enable=True, trusted_keys=(STRANGER.public_key(),))
    svc = PushService(config, tmp_path / "state", daemon.socket, "/nix/store")
    made = made_path(tmp_path, "push-stranger", "x\n", STRANGER)
    with pytest.raises(UploadRefused, match="trusted-public-keys") as exc:
        await svc.import_path(await upload(svc, made))
    assert exc.value.status == 424
    assert not valid(daemon, made.info.path)


async def test_daemon_down_is_424_not_5xx(tmp_path: Path) -> None:
    config = PushConfig(enable=True, trusted_keys=(PUSHER.public_key(),))
    svc = PushService(config, tmp_path / "state", tmp_path / "no-daemon.socket", "/nix/store")
    made = made_path(tmp_path, "push-nodaemon", "x\n", PUSHER)
    with pytest.raises(UploadRefused, match="not your upload's fault") as exc:
        await svc.import_path(await upload(svc, made))
    assert exc.value.status == 424


async def test_body_whose_hash_is_not_its_name_is_400(tmp_path: Path, daemon: PushDaemon) -> None:
    svc = service(tmp_path, daemon)
    made = made_path(tmp_path, "push-name", "x\n", PUSHER)
    wrong = NarName(b"\x01" * 32, ".nar")
    with pytest.raises(UploadRefused, match="changed on the way") as exc:
        await svc.store_nar(wrong, Body(made.nar))
    assert exc.value.status == 400
    assert svc.pending(wrong) is None
    assert os.listdir(svc.tmp) == []


async def test_two_concurrent_imports_of_one_path(tmp_path: Path, daemon: PushDaemon) -> None:
    svc = service(tmp_path, daemon)
    other = service(tmp_path / "other-worker", daemon)  # as a second worker process would
    made = made_path(tmp_path, "push-twice", "x" * 100000, PUSHER)
    try:
        ups = [await upload(svc, made), await upload(other, made)]
        outcomes: list[str] = []

        async def one(s: PushService, up: UploadedNarInfo) -> None:
            outcomes.append(await s.import_path(up))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, svc, ups[0])
                nursery.start_soon(one, other, ups[1])
        assert sorted(outcomes) in (["already valid", "imported"], ["imported", "imported"])
        assert valid(daemon, made.info.path)
    finally:
        for s in (svc, other):
            for link in s.roots.iterdir() if s.roots.exists() else []:
                link.unlink()
        delete(daemon, made.info.path)
