"""A TCP proxy on loopback that cuts one response short, as a dropped link would, and records requests.

    with cutting_proxy(cache.hostport, cut_path="/nar/", cut_after=50_000) as proxy:
        client copies from proxy.url ...
        proxy.heads        # every HTTP/1.1 request head the client sent, in order
        proxy.cut          # set once a response was cut

The first response to a request whose path starts with `cut_path` is forwarded for `cut_after` bytes
(status line and headers included), then both connections are closed. Everything else passes unchanged.
Plain HTTP/1.1 only (what Nix speaks without TLS); the client does not pipeline.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

IO_TIMEOUT = 60.0


@dataclass
class CuttingProxy:
    port: int
    cut_path: str
    cut_after: int
    heads: list[str] = field(default_factory=list)
    cut: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests_for(self, prefix: str) -> list[str]:
        with self.lock:
            return [h for h in self.heads if h.split(" ", 2)[1].startswith(prefix)]


def request_heads(buffer: bytearray) -> list[str]:
    """Take the complete request heads off the front of `buffer` (bodiless requests)."""
    heads = []
    while (end := buffer.find(b"\r\n\r\n")) >= 0:
        heads.append(bytes(buffer[:end]).decode("latin-1"))
        del buffer[: end + 4]
    return heads


def header(head: str, name: str) -> str | None:
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def _connection(proxy: CuttingProxy, client: socket.socket, upstream: tuple[str, int]) -> None:
    server = socket.create_connection(upstream, timeout=IO_TIMEOUT)
    client.settimeout(IO_TIMEOUT)
    budget: list[int | None] = [None]  # bytes of the current response still forwarded before the cut

    def upstream_to_client() -> None:
        try:
            while data := server.recv(65536):
                left = budget[0]
                if left is not None:
                    if len(data) >= left:
                        client.sendall(data[:left])
                        proxy.cut.set()
                        return
                    budget[0] = left - len(data)
                client.sendall(data)
        except OSError:
            pass
        finally:
            _close(client, server)

    answer = threading.Thread(target=upstream_to_client, daemon=True)
    answer.start()
    pending = bytearray()
    try:
        while data := client.recv(65536):
            pending += data
            for head in request_heads(pending):
                with proxy.lock:
                    proxy.heads.append(head)
                    path = head.split(" ", 2)[1] if head.count(" ") >= 2 else ""
                    if not proxy.cut.is_set() and budget[0] is None and path.startswith(proxy.cut_path):
                        budget[0] = proxy.cut_after
            server.sendall(data)
    except OSError:
        pass
    finally:
        _close(client, server)
        answer.join(IO_TIMEOUT)


@contextmanager
def cutting_proxy(upstream: str, cut_path: str, cut_after: int) -> Iterator[CuttingProxy]:
    host, port = upstream.rsplit(":", 1)
    listener = socket.create_server(("127.0.0.1", 0))
    proxy = CuttingProxy(listener.getsockname()[1], cut_path, cut_after)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_connection, args=(proxy, client, (host, int(port))), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield proxy
    finally:
        stop.set()
        _close(listener)
        acceptor.join(IO_TIMEOUT)
