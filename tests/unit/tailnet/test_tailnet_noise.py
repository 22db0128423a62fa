"""Noise IK as ts2021 uses it: pinned vectors (derived once from fixed keys; the e2e tests prove the
same code interoperates with Go and Rust clients), an independent HKDF check, and refusals."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tests.tailnet import noise
from tests.tailnet.keys import PrivateKey

SERVER = PrivateKey(bytes(range(32)))
MACHINE = PrivateKey(bytes(range(32, 64)))
CLIENT_E = PrivateKey(bytes(range(64, 96)))
SERVER_E = PrivateKey(bytes(range(96, 128)))

INIT_HEX = (
    "008201006079a631eede1bf9c98f12032cdeadd0e7a079398fc786b88cc846ec89af85a51a5a5d3ec50c63b0e015"
    "6101cf138f46d05427ed87f592c2009bab26f178d726e3f9f218a1e002bd7ccc15154108a56bf96ff917c8329cc9"
    "38928f51ba487e43a1"
)
RESP_HEX = (
    "020030675dd574ed7789310b3d2e7681f3790b466c773b1521fecf36577958371ea52f6a7db785c4017c14d4913e68639b27c7"
)
HASH_HEX = "06b746dad63b0aeda7feb70537f9f33e83901538817163ee1b26e9b63f893f6c"


def _handshake() -> tuple[noise.Initiation, bytes, noise.Transport]:
    init = noise.initiate(MACHINE, SERVER.public, 130, ephemeral=CLIENT_E)
    resp, server_side = noise.respond(SERVER, init.message, ephemeral=SERVER_E)
    return init, resp, server_side


def test_initiation_and_response_match_pinned_vectors() -> None:
    init, resp, server_side = _handshake()
    assert init.message.hex() == INIT_HEX
    assert len(init.message) == noise.INITIATION_LEN == 101
    assert init.message[:5] == bytes([0, 130, 1, 0, 96])  # version 130 BE, type 1, length 96 BE
    assert resp.hex() == RESP_HEX
    assert len(resp) == noise.RESPONSE_LEN == 51
    assert server_side.handshake_hash.hex() == HASH_HEX
    assert server_side.peer_static == MACHINE.public
    assert server_side.version == 130


def test_transport_records_both_ways() -> None:
    init, resp, server_side = _handshake()
    client_side = noise.finish_initiator(init, resp)
    assert client_side.handshake_hash == server_side.handshake_hash
    assert client_side.seal_records(b"hello").hex() == "04001575f1f2d6777cc3f81453c77f9ff260bb221db186eb"
    record = server_side.seal_records(b"world")
    assert record.hex() == "04001553905a351c26c5ba22418c643d7df5c327df4bd0a7"
    assert noise.parse_record_header(record[:3]) == len(record) - 3
    assert client_side.receive.decrypt(record[3:]) == b"world"


def test_counter_nonce_is_big_endian() -> None:
    init, resp, server_side = _handshake()
    client_side = noise.finish_initiator(init, resp)
    records = [server_side.send.encrypt(b"x") for _ in range(300)]
    # Decrypting out of order fails: each record has its own counter value.
    with pytest.raises(noise.NoiseError):
        client_side.receive.decrypt(records[1])
    fresh = noise.CipherState(server_side.send._key)
    for _ in range(256):
        fresh._nonce()
    assert fresh._nonce() == bytes(4) + (256).to_bytes(8, "big")


def test_large_payload_is_split_into_max_size_records() -> None:
    init, resp, server_side = _handshake()
    client_side = noise.finish_initiator(init, resp)
    data = bytes(range(256)) * 40  # 10240 bytes
    sealed = server_side.seal_records(data)
    out, pos, sizes = bytearray(), 0, []
    while pos < len(sealed):
        n = noise.parse_record_header(sealed[pos : pos + 3])
        sizes.append(n + 3)
        out += client_side.receive.decrypt(sealed[pos + 3 : pos + 3 + n])
        pos += 3 + n
    assert bytes(out) == data
    assert max(sizes) == noise.MAX_MESSAGE_LEN == 4096


def test_protocol_name_hash_and_hkdf_match_independent_implementations() -> None:
    s = noise.SymmetricState()
    assert s.h == hashlib.blake2s(b"Noise_IK_25519_ChaChaPoly_BLAKE2s").digest() == s.ck
    ck, ikm = bytes(range(32)), b"input key material"
    expected = HKDF(algorithm=hashes.BLAKE2s(32), length=64, salt=ck, info=b"").derive(ikm)
    assert b"".join(noise.hkdf2(ck, ikm)) == expected
    assert noise.prologue(130) == b"Tailscale Control Protocol v130"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m[:100], "must be 101 bytes"),
        (lambda m: m[:2] + b"\x02" + m[3:], "expected a handshake initiation"),
        (lambda m: m[:3] + b"\x00\x61" + m[5:], "wrong handshake initiation length"),
        (lambda m: m[:40] + bytes([m[40] ^ 1]) + m[41:], "authentication failed"),
        (lambda m: m[:-1] + bytes([m[-1] ^ 1]), "authentication failed"),
        (lambda m: m[:1] + b"\x83" + m[2:], "authentication failed"),  # version is in the prologue
    ],
)
def test_server_refuses_bad_initiations(mutate: Callable[[bytes], bytes], message: str) -> None:
    init = noise.initiate(MACHINE, SERVER.public, 130, ephemeral=CLIENT_E)
    with pytest.raises(noise.NoiseError, match=message):
        noise.respond(SERVER, mutate(init.message))


def test_initiation_for_another_server_key_is_refused() -> None:
    init = noise.initiate(MACHINE, PrivateKey.generate().public, 130)
    with pytest.raises(noise.NoiseError):
        noise.respond(SERVER, init.message)


def test_record_header_limits() -> None:
    with pytest.raises(noise.NoiseError, match="type 4"):
        noise.parse_record_header(b"\x05\x00\x20")
    with pytest.raises(noise.NoiseError, match="exceeds"):
        noise.parse_record_header(b"\x04\x0f\xfe")  # 4094 > 4093
    with pytest.raises(noise.NoiseError, match="shorter than its tag"):
        noise.parse_record_header(b"\x04\x00\x05")
    assert noise.parse_record_header(b"\x04\x0f\xfd") == 4093


def test_error_message_and_client_sees_refusal() -> None:
    init = noise.initiate(MACHINE, SERVER.public, 130)
    with pytest.raises(noise.NoiseError, match="server refused: b'nope'"):
        noise.finish_initiator(init, noise.error_message("nope"))
