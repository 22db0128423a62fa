"""Reads and writes on a non-blocking socket without trio's socket wrappers, for the exchanges
where those wrappers cost more than the work: a keep-alive request, a daemon query.

Both sides of such an exchange answer only after being asked, so a read is waited for first (a
read tried at once would fail and cost a syscall and an exception), and a small write is tried
at once (the kernel takes it whole: one syscall, no cancel scope).
"""

from __future__ import annotations

import os

import trio


async def receive_when_ready(sock: trio.socket.SocketType, size: int) -> bytes:
    """The next bytes (b"" at the end of the stream), once the socket is readable."""
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            return os.read(sock.fileno(), size)
        except BlockingIOError:
            continue


def write_now(sock: trio.socket.SocketType, data: bytes) -> int:
    """How much of `data` the kernel took at once (0 when its buffer is full). Other errors
    (a reset, a broken pipe) are the caller's to map."""
    try:
        return os.write(sock.fileno(), data)
    except BlockingIOError:
        return 0
