"""Byte-stream helpers: a buffered reader with push-back, and the Noise record stream."""

from __future__ import annotations

import struct

import trio

from .noise import HEADER_LEN, Transport, parse_record_header


class PeerClosed(Exception):
    """The peer closed the connection (possibly in the middle of a message)."""


class Reader:
    """Reads exact amounts from a trio stream; starts with bytes already read by someone else."""

    def __init__(self, stream: trio.abc.ReceiveStream, initial: bytes = b"") -> None:
        self._stream = stream
        self._buf = bytearray(initial)

    async def _fill(self) -> None:
        data = await self._stream.receive_some(65536)
        if not data:
            raise PeerClosed("connection closed by peer")
        self._buf += data

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            await self._fill()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def read_some(self) -> bytes:
        if not self._buf:
            try:
                await self._fill()
            except PeerClosed:
                return b""
        out = bytes(self._buf)
        self._buf.clear()
        return out


class NoiseStream:
    """Application bytes over Noise transport records (one direction each, own counters)."""

    def __init__(self, stream: trio.abc.Stream, reader: Reader, transport: Transport) -> None:
        self._stream = stream
        self._reader = reader
        self.transport = transport
        self._send_lock = trio.Lock()

    @property
    def peer_static(self) -> bytes:
        return self.transport.peer_static

    async def receive_some(self) -> bytes:
        """One record's plaintext; ``b""`` when the peer closed between records."""
        try:
            header = await self._reader.read_exactly(HEADER_LEN)
        except PeerClosed:
            return b""
        length = parse_record_header(header)
        ciphertext = await self._reader.read_exactly(length)
        return self.transport.receive.decrypt(ciphertext)

    async def send_all(self, data: bytes) -> None:
        if not data:
            return
        async with self._send_lock:
            await self._stream.send_all(self.transport.seal_records(data))

    async def aclose(self) -> None:
        await self._stream.aclose()


def u32be(n: int) -> bytes:
    return struct.pack(">I", n)
