"""A minimal ts2021 + DERP client in Python, to test the server without real nodes (and to poke
at it from tests: register a fake node, read its map stream, relay a packet).

Not a Tailscale node: it carries no WireGuard traffic.
"""

from __future__ import annotations

import base64
import json
import secrets
import struct
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h11
import trio
from nacl.public import Box
from nacl.public import PrivateKey as NaclPrivateKey
from nacl.public import PublicKey as NaclPublicKey

from . import keys, noise
from .keys import PrivateKey
from .streams import NoiseStream, Reader
from .wire import (
    DERP_HEADER_LEN,
    DERP_MAGIC,
    EARLY_PAYLOAD_MAGIC,
    NONCE_LEN,
    DerpFrame,
    FrameError,
    MapFrameDecoder,
    derp_frame,
    parse_derp_header,
)

CAPVER = 130


class HttpError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300]!r}")
        self.status = status
        self.body = body


async def _h11_request(
    stream: trio.abc.Stream,
    method: str,
    target: str,
    host: str,
    headers: list[tuple[str, str]],
    body: bytes = b"",
) -> tuple[h11.Response | h11.InformationalResponse, bytes, h11.Connection]:
    conn = h11.Connection(h11.CLIENT)
    hdrs = [("Host", host), *headers]
    if body or method == "POST":
        hdrs.append(("Content-Length", str(len(body))))
    data = conn.send(h11.Request(method=method, target=target, headers=hdrs)) or b""
    if body:
        data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
    out = bytearray()
    response: h11.Response | h11.InformationalResponse | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if conn.their_state is h11.SWITCHED_PROTOCOL:
                assert response is not None
                return response, bytes(out), conn
            chunk = await stream.receive_some(65536)
            conn.receive_data(bytes(chunk))
        elif isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            return event, b"", conn
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            out += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            assert response is not None
            return response, bytes(out), conn


async def fetch_server_key(host: str, port: int) -> bytes:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        resp, body, _ = await _h11_request(stream, "GET", f"/key?v={CAPVER}", f"{host}:{port}", [])
    if resp.status_code != 200:
        raise HttpError(resp.status_code, body)
    return keys.parse_public(json.loads(body)["publicKey"], keys.MACHINE)


@dataclass
class ControlClient:
    """An HTTP/2 client over an established Noise session."""

    noise: NoiseStream
    early_payload: dict[str, Any] | None
    _conn: h2.connection.H2Connection = field(init=False)
    _responses: dict[int, trio.MemorySendChannel[h2.events.Event]] = field(default_factory=dict)
    closed: trio.Event = field(default_factory=trio.Event)
    """Set when the server closed the connection."""

    def __post_init__(self) -> None:
        self._conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self._conn.initiate_connection()

    async def _flush(self) -> None:
        await self.noise.send_all(self._conn.data_to_send())

    async def _pump(self) -> None:
        try:
            while True:
                data = await self.noise.receive_some()
                if not data:
                    break
                for event in self._conn.receive_data(data):
                    sid = getattr(event, "stream_id", None)
                    if isinstance(event, h2.events.DataReceived) and event.stream_id is not None:
                        self._conn.acknowledge_received_data(
                            event.flow_controlled_length or 0, event.stream_id
                        )
                    if sid in self._responses:
                        self._responses[sid].send_nowait(event)
                await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.closed.set()
            for chan in self._responses.values():
                chan.close()

    async def _start(self, path: str, body: dict[str, Any]) -> trio.MemoryReceiveChannel[Any]:
        if self.closed.is_set():
            raise trio.ClosedResourceError("the server closed this control connection")
        sid = self._conn.get_next_available_stream_id()
        send, receive = trio.open_memory_channel[h2.events.Event](1000)
        self._responses[sid] = send
        self._conn.send_headers(
            sid,
            [
                (":method", "POST"),
                (":path", path),
                (":scheme", "http"),
                (":authority", "control"),
                ("content-type", "application/json"),
            ],
        )
        self._conn.send_data(sid, json.dumps(body).encode(), end_stream=True)
        await self._flush()
        return receive

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        """A request whose whole response is read."""
        receive = await self._start(path, body)
        status, out = 0, bytearray()
        async for event in receive:
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                out += event.data
            elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                break
        return status, bytes(out)

    async def register(
        self, node_key: PrivateKey, auth_key: str | None, hostname: str, **extra: Any
    ) -> tuple[int, dict[str, Any]]:
        status, body = await self.post(
            "/machine/register",
            {
                "Version": CAPVER,
                "NodeKey": keys.format_public(node_key.public, keys.NODE),
                "Auth": {"AuthKey": auth_key or ""},
                "Hostinfo": {"Hostname": hostname},
                **extra,
            },
        )
        return status, json.loads(body) if body else {}

    async def map_stream(
        self, node_key: PrivateKey, *, compress: bool = True, **extra: Any
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Yield MapResponses of a streaming poll (the first raises :class:`HttpError` if refused)."""
        receive = await self._start(
            "/machine/map",
            {
                "Version": CAPVER,
                "NodeKey": keys.format_public(node_key.public, keys.NODE),
                "Stream": True,
                "KeepAlive": True,
                "Compress": "zstd" if compress else "",
                **extra,
            },
        )
        decoder = MapFrameDecoder(compressed=compress)
        status = 0
        async for event in receive:
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                if status != 200:
                    raise HttpError(status, event.data)
                for message in decoder.feed(event.data):
                    yield message
            elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                if status != 200:
                    raise HttpError(status, b"")
                return


@asynccontextmanager
async def control_session(
    host: str,
    port: int,
    machine: PrivateKey | None = None,
) -> AsyncIterator[ControlClient]:
    """``/key``, ``POST /ts2021`` with the handshake, the early payload, then HTTP/2."""
    server_key = await fetch_server_key(host, port)
    machine = machine or PrivateKey.generate()
    init = noise.initiate(machine, server_key, CAPVER)
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        resp, body, conn = await _h11_request(
            stream,
            "POST",
            "/ts2021",
            f"{host}:{port}",
            [
                ("Upgrade", "tailscale-control-protocol"),
                ("Connection", "upgrade"),
                ("X-Tailscale-Handshake", base64.b64encode(init.message).decode()),
            ],
        )
        if resp.status_code != 101:
            raise HttpError(resp.status_code, body)
        reader = Reader(stream, conn.trailing_data[0])
        header = await reader.read_exactly(noise.HEADER_LEN)
        rest = await reader.read_exactly(struct.unpack(">H", header[1:3])[0])
        transport = noise.finish_initiator(init, header + rest)
        ns = NoiseStream(stream, reader, transport)
        first = await ns.receive_some()
        early: dict[str, Any] | None = None
        leftover = first
        if first.startswith(EARLY_PAYLOAD_MAGIC):
            while len(first) < 9:
                first += await ns.receive_some()
            (length,) = struct.unpack(">I", first[5:9])
            while len(first) < 9 + length:
                first += await ns.receive_some()
            early = json.loads(first[9 : 9 + length])
            leftover = first[9 + length :]
        client = ControlClient(ns, early)
        if leftover:
            client._conn.receive_data(leftover)
        await client._flush()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._pump)
            yield client
            nursery.cancel_scope.cancel()


# -- DERP -----------------------------------------------------------------------------------------


@dataclass
class DerpClient:
    stream: trio.abc.Stream
    reader: Reader
    server_key: bytes

    async def send(self, dest: bytes, packet: bytes) -> None:
        await self.stream.send_all(derp_frame(DerpFrame.SEND_PACKET, dest + packet))

    async def receive(self) -> tuple[int, bytes]:
        """The next frame: (type, payload)."""
        header = parse_derp_header(await self.reader.read_exactly(DERP_HEADER_LEN), max_len=1 << 20)
        return header.frame_type, await self.reader.read_exactly(header.length)


@asynccontextmanager
async def derp_session(
    host: str,
    port: int,
    node: PrivateKey,
    ssl_context: Any,
) -> AsyncIterator[DerpClient]:
    raw = await trio.open_tcp_stream(host, port)
    stream = trio.SSLStream(raw, ssl_context, server_hostname=host, https_compatible=True)
    async with stream:
        resp, body, conn = await _h11_request(
            stream, "GET", "/derp", f"{host}:{port}", [("Upgrade", "DERP"), ("Connection", "Upgrade")]
        )
        if resp.status_code != 101:
            raise HttpError(resp.status_code, body)
        reader = Reader(stream, conn.trailing_data[0])
        client = DerpClient(stream, reader, b"")
        kind, payload = await client.receive()
        if kind != DerpFrame.SERVER_KEY or not payload.startswith(DERP_MAGIC):
            raise FrameError("expected the server key frame")
        client.server_key = payload[len(DERP_MAGIC) :]
        box = Box(NaclPrivateKey(node.raw), NaclPublicKey(client.server_key))
        sealed = box.encrypt(json.dumps({"version": 2}).encode(), secrets.token_bytes(NONCE_LEN))
        await stream.send_all(derp_frame(DerpFrame.CLIENT_INFO, node.public + bytes(sealed)))
        kind, payload = await client.receive()
        if kind != DerpFrame.SERVER_INFO:
            raise FrameError("expected the server info frame")
        json.loads(box.decrypt(payload[NONCE_LEN:], payload[:NONCE_LEN]))
        yield client
