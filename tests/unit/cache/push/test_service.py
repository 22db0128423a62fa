"""The push service's upload side, without a daemon (imports are judged against a real daemon in
tests/e2e/cache/test_push_service.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import trio

from cache.push.config import PushConfig
from cache.push.service import PushService
from cache.push.upload import NarName
from cache.signing import SecretKey

NAR = b"nix-archive-1 pretend " * 5000


class Body:
    def __init__(self, data: bytes, chunk: int = 1000) -> None:
        self.length: int | None = len(data)
        self._parts = [data[i : i + chunk] for i in range(0, len(data), chunk)]

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await trio.lowlevel.checkpoint()  # interleave with a concurrent upload
        return self._parts.pop(0) if self._parts else b""


def service(tmp_path: Path) -> PushService:
    config = PushConfig(enable=True, trusted_keys=(SecretKey.generate("k").public_key(),))
    return PushService(config, tmp_path / "state", tmp_path / "no.socket", "/nix/store")


async def test_two_uploads_of_one_nar_at_once(tmp_path: Path) -> None:
    svc = service(tmp_path)
    name = NarName(hashlib.sha256(NAR).digest(), ".nar")
    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(svc.store_nar, name, Body(NAR))
    pending = svc.pending(name)
    assert pending is not None
    assert pending.nar_hash == hashlib.sha256(NAR).digest() and pending.nar_size == len(NAR)
    assert await trio.Path(pending.data).read_bytes() == NAR
    assert os.listdir(svc.tmp) == []  # no temporary file left behind
