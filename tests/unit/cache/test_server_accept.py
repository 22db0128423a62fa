"""The accept loop's handling of accept() errors: capacity errors back off and retry, a
connection already gone is skipped, a broken listener ends the worker (it is restarted)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import trio

from cache.server import Worker
from tests.support.standin import StandInStore, make_app


class FailingListener:
    def __init__(self, errnos: list[int]) -> None:
        self.errnos = errnos
        self.calls = 0

    async def accept(self) -> tuple[object, object]:
        await trio.lowlevel.checkpoint()
        self.calls += 1
        raise OSError(self.errnos.pop(0), "accept failed")


async def test_capacity_errors_retry_and_gone_clients_are_skipped(tmp_path: Path) -> None:
    store = StandInStore(tmp_path / "store")
    app = make_app(store, tmp_path)
    worker = Worker(app, app.config)
    listener = FailingListener([errno.EMFILE, errno.ENFILE, errno.ECONNABORTED, errno.ENOBUFS, errno.EBADF])
    with trio.fail_after(5):
        async with trio.open_nursery() as conns:
            with pytest.raises(OSError, match="accept failed") as caught:
                await worker.accept_loop(listener, conns)  # type: ignore[arg-type]
    assert caught.value.errno == errno.EBADF
    assert listener.calls == 5  # every retryable error was retried
