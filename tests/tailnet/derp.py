"""A DERP relay: clients address each other by node key; the relay forwards opaque packets.

Per connection: server-key frame (magic + our public key), then the client's info frame (its node
key, a nonce and a NaCl box of JSON), then our info frame (a boxed ``{"version": 2}``); after that
send-packet frames from the client become receive-packet frames at the destination, pings get
pongs, and we send keep-alives. When a client goes, the peers it sent to get a peer-gone frame; a
packet for a key that is not connected gets a peer-gone "not here" back.
"""

from __future__ import annotations

import json
import logging
import secrets
import struct
from dataclasses import dataclass, field

import trio
from nacl.exceptions import CryptoError
from nacl.public import Box
from nacl.public import PrivateKey as NaclPrivateKey
from nacl.public import PublicKey as NaclPublicKey

from .keys import KEY_LEN, PrivateKey
from .streams import PeerClosed, Reader
from .wire import (
    DERP_HEADER_LEN,
    DERP_MAGIC,
    DERP_MAX_INFO,
    DERP_MAX_PACKET,
    DERP_PROTOCOL_VERSION,
    NONCE_LEN,
    PEER_GONE_DISCONNECTED,
    PEER_GONE_NOT_HERE,
    DerpFrame,
    FrameError,
    derp_frame,
    parse_derp_header,
)

log = logging.getLogger("tailnet.derp")

QUEUE_DEPTH = 64
MAX_FRAME = KEY_LEN + DERP_MAX_PACKET


@dataclass(eq=False)
class _Client:
    key: bytes
    peer: str
    send: trio.MemorySendChannel[bytes]
    sent_to: set[bytes] = field(default_factory=set)


class DerpServer:
    def __init__(self, private: PrivateKey | None = None, *, keepalive_interval: float = 60.0) -> None:
        self.private = private or PrivateKey.generate()
        self.keepalive_interval = keepalive_interval
        self._clients: dict[bytes, _Client] = {}
        self.packets_relayed = 0

    @property
    def public(self) -> bytes:
        return self.private.public

    def connected(self) -> set[bytes]:
        return set(self._clients)

    def upgrade_headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (b"Upgrade", b"DERP"),
            (b"Connection", b"Upgrade"),
            (b"Derp-Version", str(DERP_PROTOCOL_VERSION).encode()),
            (b"Derp-Public-Key", self.public.hex().encode()),
        ]

    async def serve(self, stream: trio.abc.Stream, reader: Reader, peer: str) -> None:
        """Run the DERP protocol on an upgraded connection until either side ends it."""
        await stream.send_all(derp_frame(DerpFrame.SERVER_KEY, DERP_MAGIC + self.public))
        try:
            client_key, info = await self._read_client_info(reader)
        except (FrameError, CryptoError, ValueError) as exc:
            log.warning("derp %s: bad client info, closing: %s", peer, exc)
            return
        box = Box(NaclPrivateKey(self.private.raw), NaclPublicKey(client_key))
        reply = json.dumps({"version": DERP_PROTOCOL_VERSION}).encode()
        await stream.send_all(
            derp_frame(DerpFrame.SERVER_INFO, bytes(box.encrypt(reply, secrets.token_bytes(NONCE_LEN))))
        )
        send, receive = trio.open_memory_channel[bytes](QUEUE_DEPTH)
        client = _Client(client_key, peer, send)
        previous = self._clients.get(client_key)
        self._clients[client_key] = client
        if previous is not None:
            previous.send.close()
        log.info(
            "derp %s: client %s connected (version %s)", peer, client_key.hex()[:16], info.get("version")
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, stream, receive, nursery.cancel_scope)
                try:
                    await self._reader_loop(reader, client)
                except FrameError as exc:
                    log.warning("derp %s: %s; closing", peer, exc)
                except PeerClosed:
                    pass
                nursery.cancel_scope.cancel()
        finally:
            if self._clients.get(client_key) is client:
                del self._clients[client_key]
                self._notify_gone(client)
            log.info("derp %s: client %s disconnected", peer, client_key.hex()[:16])

    async def _read_client_info(self, reader: Reader) -> tuple[bytes, dict[str, object]]:
        header = parse_derp_header(
            await reader.read_exactly(DERP_HEADER_LEN), max_len=KEY_LEN + NONCE_LEN + DERP_MAX_INFO
        )
        if header.frame_type != DerpFrame.CLIENT_INFO:
            raise FrameError(f"expected client info frame, got type {header.frame_type:#x}")
        payload = await reader.read_exactly(header.length)
        if len(payload) < KEY_LEN + NONCE_LEN + 16:
            raise FrameError("client info frame too short")
        key = payload[:KEY_LEN]
        nonce = payload[KEY_LEN : KEY_LEN + NONCE_LEN]
        sealed = payload[KEY_LEN + NONCE_LEN :]
        box = Box(NaclPrivateKey(self.private.raw), NaclPublicKey(key))
        info = json.loads(box.decrypt(sealed, nonce))
        if not isinstance(info, dict):
            raise FrameError("client info is not a JSON object")
        return key, info

    async def _writer(
        self, stream: trio.abc.Stream, receive: trio.MemoryReceiveChannel[bytes], scope: trio.CancelScope
    ) -> None:
        try:
            while True:
                with trio.move_on_after(self.keepalive_interval) as timer:
                    frame = await receive.receive()
                if timer.cancelled_caught:
                    frame = derp_frame(DerpFrame.KEEP_ALIVE)
                await stream.send_all(frame)
        except (trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # replaced by a newer connection with the same key, or the socket broke
        scope.cancel()

    def _enqueue(self, client: _Client, frame: bytes) -> None:
        try:
            client.send.send_nowait(frame)
        except trio.WouldBlock:
            log.debug("derp: queue of %s full, dropping a frame", client.key.hex()[:16])
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def _reader_loop(self, reader: Reader, client: _Client) -> None:
        while True:
            header = parse_derp_header(await reader.read_exactly(DERP_HEADER_LEN), max_len=MAX_FRAME)
            payload = await reader.read_exactly(header.length)
            kind = header.frame_type
            if kind == DerpFrame.SEND_PACKET:
                if len(payload) < KEY_LEN:
                    raise FrameError("send-packet frame shorter than a key")
                self._relay(client, payload[:KEY_LEN], payload[KEY_LEN:])
            elif kind == DerpFrame.PING:
                if len(payload) != 8:
                    raise FrameError("ping frame must carry 8 bytes")
                self._enqueue(client, derp_frame(DerpFrame.PONG, payload))
            elif kind in (DerpFrame.NOTE_PREFERRED, DerpFrame.PONG, DerpFrame.KEEP_ALIVE):
                pass
            else:
                log.debug("derp %s: ignoring frame type %#x", client.peer, kind)

    def _relay(self, source: _Client, dest_key: bytes, packet: bytes) -> None:
        dest = self._clients.get(dest_key)
        if dest is None:
            self._enqueue(source, derp_frame(DerpFrame.PEER_GONE, dest_key + bytes([PEER_GONE_NOT_HERE])))
            return
        source.sent_to.add(dest_key)
        self.packets_relayed += 1
        self._enqueue(dest, derp_frame(DerpFrame.RECV_PACKET, source.key + packet))

    def _notify_gone(self, gone: _Client) -> None:
        frame = derp_frame(DerpFrame.PEER_GONE, gone.key + bytes([PEER_GONE_DISCONNECTED]))
        for key in gone.sent_to:
            other = self._clients.get(key)
            if other is not None:
                self._enqueue(other, frame)


def unpack_peer_gone(payload: bytes) -> tuple[bytes, int]:
    key, reason = struct.unpack(">32sB", payload[:33])
    return key, reason
