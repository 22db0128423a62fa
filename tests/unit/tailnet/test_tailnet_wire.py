"""Frame codecs, key parsing and the STUN responder's packets (pure)."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from tests.tailnet import keys, stun, wire


def test_map_frame_length_is_little_endian_and_zstd() -> None:
    frame = wire.encode_map_frame({"KeepAlive": True}, compress=True)
    (length,) = struct.unpack("<I", frame[:4])
    assert length == len(frame) - 4
    assert json.loads(zstandard.ZstdDecompressor().decompress(frame[4:])) == {"KeepAlive": True}
    plain = wire.encode_map_frame({"a": 1}, compress=False)
    assert plain == struct.pack("<I", 7) + b'{"a":1}'


@given(
    st.lists(st.dictionaries(st.text(max_size=5), st.integers(), max_size=4), max_size=5),
    st.booleans(),
    st.integers(min_value=1, max_value=7),
)
def test_map_frame_decoder_handles_any_chunking(
    messages: list[dict[str, int]], compress: bool, chunk: int
) -> None:
    data = b"".join(wire.encode_map_frame(m, compress=compress) for m in messages)
    decoder = wire.MapFrameDecoder(compressed=compress)
    out: list[dict[str, Any]] = []
    for i in range(0, len(data), chunk):
        out.extend(decoder.feed(data[i : i + chunk]))
    assert out == messages


def test_map_frame_decoder_refuses_oversized_and_garbage() -> None:
    with pytest.raises(wire.FrameError, match="exceeds"):
        list(wire.MapFrameDecoder(compressed=False, max_frame=10).feed(struct.pack("<I", 11)))
    with pytest.raises(wire.FrameError, match="not JSON"):
        list(wire.MapFrameDecoder(compressed=False).feed(struct.pack("<I", 3) + b"{{{"))


def test_early_payload_layout() -> None:
    data = wire.encode_early_payload("chalpub:" + "ab" * 32)
    assert data[:5] == b"\xff\xff\xffTS"
    (length,) = struct.unpack(">I", data[5:9])
    assert json.loads(data[9:]) == {"nodeKeyChallenge": "chalpub:" + "ab" * 32}
    assert length == len(data) - 9


def test_derp_frames() -> None:
    assert wire.DERP_MAGIC == b"DERP\xf0\x9f\x94\x91"
    frame = wire.derp_frame(wire.DerpFrame.PING, b"12345678")
    assert frame == b"\x12\x00\x00\x00\x0812345678"
    header = wire.parse_derp_header(frame[:5], max_len=100)
    assert (header.frame_type, header.length) == (0x12, 8)
    with pytest.raises(wire.FrameError, match="exceeds"):
        wire.parse_derp_header(b"\x04\x00\x01\x00\x21", max_len=65568)


@pytest.mark.parametrize(
    ("text", "prefix", "error"),
    [
        ("nodekey:" + "00" * 32, "mkey", "expected a mkey: key"),
        ("mkey:" + "0" * 63, "mkey", "64 hex digits"),
        ("mkey:" + "zz" * 32, "mkey", "not hexadecimal"),
        (42, "mkey", "as a string"),
        ("", "nodekey", "expected a nodekey: key"),
    ],
)
def test_key_parsing_refuses(text: object, prefix: str, error: str) -> None:
    with pytest.raises(keys.KeyError_, match=error):
        keys.parse_public(text, prefix)


def test_key_round_trip_and_private_repr() -> None:
    key = keys.PrivateKey.generate()
    text = keys.format_public(key.public, keys.NODE)
    assert keys.parse_public(text, keys.NODE) == key.public
    assert key.to_hex() not in repr(key)
    assert keys.PrivateKey.from_hex(key.to_hex()) == key


def test_stun_binding_response() -> None:
    txid = bytes(range(12))
    request = struct.pack(">HHI", 0x0001, 0, stun.MAGIC_COOKIE) + txid
    assert stun.parse_binding_request(request) == txid
    resp = stun.binding_response(txid, "10.77.0.2", 41641)
    msg_type, length, cookie = struct.unpack(">HHI", resp[:8])
    assert (msg_type, cookie, resp[8:20]) == (0x0101, stun.MAGIC_COOKIE, txid)
    attr_type, attr_len, _, family, xport = struct.unpack(">HHBBH", resp[20:28])
    assert (attr_type, attr_len, family) == (0x0020, 8, 1)
    assert xport ^ 0x2112 == 41641
    addr = bytes(a ^ b for a, b in zip(resp[28:32], struct.pack(">I", stun.MAGIC_COOKIE), strict=True))
    assert addr == bytes([10, 77, 0, 2])
    assert length == len(resp) - 20
    with pytest.raises(stun.StunError):
        stun.parse_binding_request(b"\x00\x01" + b"\x00" * 10)
