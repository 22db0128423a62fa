"""The accept loop's cheap check, on real loopback sockets: a connection its client reset or closed
before sending a byte is dropped; one that is open (silent or speaking) is served."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from cache.server import dead_on_arrival


@pytest.fixture
def accepted() -> Iterator[Callable[[Callable[[socket.socket], None]], socket.socket]]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    opened: list[socket.socket] = []

    def accept(client_does: Callable[[socket.socket], None]) -> socket.socket:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        opened.append(client)
        server, _ = listener.accept()
        opened.append(server)
        client_does(client)
        time.sleep(0.05)  # the client's FIN or RST reaches the server's socket
        return server

    yield accept
    for s in opened:
        s.close()
    listener.close()


def reset(client: socket.socket) -> None:
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


def test_reset_before_a_byte_is_dead(accepted: Callable[..., socket.socket]) -> None:
    assert dead_on_arrival(accepted(reset))


def test_closed_before_a_byte_is_dead(accepted: Callable[..., socket.socket]) -> None:
    assert dead_on_arrival(accepted(lambda c: c.close()))


def test_silent_open_connection_is_alive(accepted: Callable[..., socket.socket]) -> None:
    assert not dead_on_arrival(accepted(lambda c: None))


def test_request_then_half_close_is_alive(accepted: Callable[..., socket.socket]) -> None:
    def speak(c: socket.socket) -> None:
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        c.shutdown(socket.SHUT_WR)

    server = accepted(speak)
    assert not dead_on_arrival(server)
    assert server.recv(100).startswith(b"GET /")  # the peek consumed nothing
