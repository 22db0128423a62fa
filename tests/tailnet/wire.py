"""Framings that ride inside the control and DERP connections. Pure code: bytes in, bytes out.

* Early payload (server → client, first thing inside Noise): ``\\xff\\xff\\xffTS``, a 4-byte
  big-endian length, JSON (``{"nodeKeyChallenge": "chalpub:…"}``).
* Map frames (inside an HTTP/2 response body): a 4-byte **little-endian** length, then the
  MapResponse JSON, zstd-compressed when the request asked for ``Compress: "zstd"``.
* DERP frames: a 1-byte type, a 4-byte big-endian length, the payload.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import zstandard

EARLY_PAYLOAD_MAGIC = b"\xff\xff\xffTS"
MAX_MAP_FRAME = 64 << 20


class FrameError(ValueError):
    """A malformed or oversized frame from the peer."""


def encode_early_payload(challenge_public: str) -> bytes:
    body = json.dumps({"nodeKeyChallenge": challenge_public}, separators=(",", ":")).encode()
    return EARLY_PAYLOAD_MAGIC + struct.pack(">I", len(body)) + body


def encode_map_frame(message: dict[str, Any], *, compress: bool) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if compress:
        body = zstandard.ZstdCompressor().compress(body)
    return struct.pack("<I", len(body)) + body


class MapFrameDecoder:
    """Incremental decoder for a map response body (the client side; used by our tests)."""

    def __init__(self, *, compressed: bool, max_frame: int = MAX_MAP_FRAME) -> None:
        self._buf = bytearray()
        self._compressed = compressed
        self._max = max_frame

    def feed(self, data: bytes) -> Iterator[dict[str, Any]]:
        self._buf += data
        while len(self._buf) >= 4:
            (length,) = struct.unpack("<I", self._buf[:4])
            if length > self._max:
                raise FrameError(f"map frame of {length} bytes exceeds {self._max}")
            if len(self._buf) < 4 + length:
                return
            body = bytes(self._buf[4 : 4 + length])
            del self._buf[: 4 + length]
            if self._compressed:
                body = zstandard.ZstdDecompressor().decompress(body, max_output_size=self._max)
            try:
                message = json.loads(body)
            except ValueError as exc:
                raise FrameError(f"map frame is not JSON: {exc}") from None
            if not isinstance(message, dict):
                raise FrameError("map frame is not a JSON object")
            yield message


# -- DERP ------------------------------------------------------------------------------------------

DERP_MAGIC = "DERP🔑".encode()  # 8 bytes
DERP_PROTOCOL_VERSION = 2
DERP_HEADER_LEN = 5
DERP_MAX_PACKET = 64 << 10
DERP_MAX_INFO = 1 << 20
NONCE_LEN = 24


class DerpFrame:
    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    FORWARD_PACKET = 0x0A
    WATCH_CONNS = 0x10
    CLOSE_PEER = 0x11
    PING = 0x12
    PONG = 0x13
    HEALTH = 0x14
    RESTARTING = 0x15


PEER_GONE_DISCONNECTED = 0x00
PEER_GONE_NOT_HERE = 0x01


def derp_frame(frame_type: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BI", frame_type, len(payload)) + payload


@dataclass(frozen=True)
class DerpHeader:
    frame_type: int
    length: int


def parse_derp_header(header: bytes, *, max_len: int) -> DerpHeader:
    if len(header) != DERP_HEADER_LEN:
        raise FrameError("short DERP frame header")
    frame_type, length = struct.unpack(">BI", header)
    if length > max_len:
        raise FrameError(f"DERP frame type {frame_type:#x} of {length} bytes exceeds {max_len}")
    return DerpHeader(frame_type, length)
