"""Plain-socket reads and writes: a read waits for data, a write never blocks."""

from __future__ import annotations

import trio
import trio.testing

from cache.plainsocket import receive_when_ready, write_now


async def test_a_read_waits_for_the_peer_and_sees_the_end() -> None:
    a, b = trio.socket.socketpair()
    with a, b:
        got: list[bytes] = []

        async def reader() -> None:
            got.append(await receive_when_ready(a, 100))
            got.append(await receive_when_ready(a, 100))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # nothing sent yet: waiting, not failing
            assert write_now(b, b"hello") == 5
            await trio.testing.wait_all_tasks_blocked()
            b.close()
        assert got == [b"hello", b""]


async def test_a_write_to_a_full_buffer_takes_nothing_instead_of_blocking() -> None:
    a, b = trio.socket.socketpair()
    with a, b:
        block = b"x" * 65536
        while write_now(a, block):
            pass
        assert write_now(a, b"more") == 0
