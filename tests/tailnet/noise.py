"""Noise_IK_25519_ChaChaPoly_BLAKE2s as Tailscale's control protocol ("ts2021") uses it.

Pure code: no sockets, no trio. The rules, as the clients implement them:

* The handshake hash starts as BLAKE2s(protocol name) (the name is 33 bytes, longer than a hash),
  the chaining key equals it; then the prologue ``"Tailscale Control Protocol v<version>"`` (the
  version is the one in the initiation's cleartext header) and the server's static key are mixed in.
* HKDF is HMAC-BLAKE2s with the chaining key as salt. Every handshake key is used once, with an
  all-zero nonce.
* Initiation (client → server, 101 bytes): version (2, big-endian), type 1, length (2, big-endian,
  = 96), ephemeral key (32), sealed machine key (48), tag of the empty payload (16).
* Response (server → client, 51 bytes): type 2, length (2, = 48), ephemeral key (32), tag (16).
* Refusal (server → client): type 3, length, a plain message.
* Split: the client sends with the first key and receives with the second; the server the reverse.
* Transport records: type 4, length (2, big-endian), ciphertext; at most 4096 bytes a record on the
  wire. The nonce is 4 zero bytes and a big-endian 64-bit counter, one counter per direction.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from .keys import KEY_LEN, KeyError_, PrivateKey, x25519

PROTOCOL_NAME = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
PROLOGUE_PREFIX = b"Tailscale Control Protocol v"

MSG_INITIATION = 1
MSG_RESPONSE = 2
MSG_ERROR = 3
MSG_RECORD = 4

TAG_LEN = 16
HEADER_LEN = 3
INITIATION_HEADER_LEN = 5
INITIATION_PAYLOAD_LEN = KEY_LEN + KEY_LEN + TAG_LEN + TAG_LEN  # 96
INITIATION_LEN = INITIATION_HEADER_LEN + INITIATION_PAYLOAD_LEN  # 101
RESPONSE_PAYLOAD_LEN = KEY_LEN + TAG_LEN  # 48
RESPONSE_LEN = HEADER_LEN + RESPONSE_PAYLOAD_LEN  # 51
MAX_MESSAGE_LEN = 4096
MAX_CIPHERTEXT_LEN = MAX_MESSAGE_LEN - HEADER_LEN  # 4093
MAX_PLAINTEXT_LEN = MAX_CIPHERTEXT_LEN - TAG_LEN  # 4077

_ZERO_NONCE = bytes(12)


class NoiseError(Exception):
    """The peer broke the Noise protocol (bad message, failed authentication)."""


def prologue(version: int) -> bytes:
    return PROLOGUE_PREFIX + str(version).encode()


def _hash(*parts: bytes) -> bytes:
    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def hkdf2(chaining_key: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    """Noise's HKDF with two outputs (RFC 5869 with the chaining key as salt, empty info)."""
    prk = _hmac(chaining_key, ikm)
    out1 = _hmac(prk, b"\x01")
    out2 = _hmac(prk, out1 + b"\x02")
    return out1, out2


def _seal(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    return bytes(crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key))


def _open(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    try:
        return bytes(crypto_aead_chacha20poly1305_ietf_decrypt(ciphertext, ad, nonce, key))
    except CryptoError:
        raise NoiseError("message authentication failed") from None


class SymmetricState:
    """The hash and chaining key of a handshake in progress."""

    def __init__(self) -> None:
        self.h = _hash(PROTOCOL_NAME)
        self.ck = self.h

    def mix_hash(self, data: bytes) -> None:
        self.h = _hash(self.h, data)

    def mix_dh(self, private: bytes, public: bytes) -> bytes:
        """MixKey(X25519(private, public)); returns the single-use key."""
        try:
            shared = x25519(private, public)
        except KeyError_ as exc:
            raise NoiseError(str(exc)) from None
        self.ck, key = hkdf2(self.ck, shared)
        return key

    def encrypt_and_hash(self, key: bytes, plaintext: bytes) -> bytes:
        ciphertext = _seal(key, _ZERO_NONCE, plaintext, self.h)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, key: bytes, ciphertext: bytes) -> bytes:
        plaintext = _open(key, _ZERO_NONCE, ciphertext, self.h)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        return hkdf2(self.ck, b"")


class CipherState:
    """One direction of the transport: a key and a message counter."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._n = 0

    def _nonce(self) -> bytes:
        if self._n >= 2**64 - 1:
            raise NoiseError("nonce space exhausted")
        nonce = b"\x00\x00\x00\x00" + struct.pack(">Q", self._n)
        self._n += 1
        return nonce

    def encrypt(self, plaintext: bytes) -> bytes:
        return _seal(self._key, self._nonce(), plaintext, b"")

    def decrypt(self, ciphertext: bytes) -> bytes:
        return _open(self._key, self._nonce(), ciphertext, b"")


@dataclass
class Transport:
    """The result of a handshake: both cipher states, the peer's static key and the version."""

    send: CipherState
    receive: CipherState
    peer_static: bytes
    version: int
    handshake_hash: bytes

    def seal_records(self, data: bytes) -> bytes:
        """Encrypt ``data`` into as many records as it takes."""
        out = bytearray()
        for i in range(0, len(data), MAX_PLAINTEXT_LEN):
            ciphertext = self.send.encrypt(data[i : i + MAX_PLAINTEXT_LEN])
            out += struct.pack(">BH", MSG_RECORD, len(ciphertext)) + ciphertext
        return bytes(out)


def parse_record_header(header: bytes) -> int:
    """Validate a 3-byte record header; returns the ciphertext length that follows."""
    msg_type, length = struct.unpack(">BH", header)
    if msg_type != MSG_RECORD:
        raise NoiseError(f"expected a transport record (type 4), got type {msg_type}")
    if length > MAX_CIPHERTEXT_LEN:
        raise NoiseError(f"record of {length} bytes exceeds {MAX_CIPHERTEXT_LEN}")
    if length < TAG_LEN:
        raise NoiseError(f"record of {length} bytes is shorter than its tag")
    return int(length)


def error_message(text: str) -> bytes:
    """A cleartext refusal (type 3) as the server sends it instead of a response."""
    body = text.encode()[:0xFFFF]
    return struct.pack(">BH", MSG_ERROR, len(body)) + body


# -- the two roles -------------------------------------------------------------------------------


@dataclass
class Initiation:
    message: bytes
    state: SymmetricState
    ephemeral: PrivateKey
    machine: PrivateKey
    server_public: bytes
    version: int


def initiate(
    machine: PrivateKey, server_public: bytes, version: int, ephemeral: PrivateKey | None = None
) -> Initiation:
    """Client side, first half: build the initiation message (-> e, es, s, ss)."""
    e = ephemeral or PrivateKey.generate()
    s = SymmetricState()
    s.mix_hash(prologue(version))
    s.mix_hash(server_public)
    s.mix_hash(e.public)
    k = s.mix_dh(e.raw, server_public)
    sealed_machine = s.encrypt_and_hash(k, machine.public)
    k = s.mix_dh(machine.raw, server_public)
    tag = s.encrypt_and_hash(k, b"")
    header = struct.pack(">HBH", version, MSG_INITIATION, INITIATION_PAYLOAD_LEN)
    return Initiation(header + e.public + sealed_machine + tag, s, e, machine, server_public, version)


def finish_initiator(init: Initiation, response: bytes) -> Transport:
    """Client side, second half: check the server's response (<- e, ee, se)."""
    if len(response) < HEADER_LEN:
        raise NoiseError("short handshake response")
    msg_type, length = struct.unpack(">BH", response[:HEADER_LEN])
    if msg_type == MSG_ERROR:
        raise NoiseError(f"server refused: {response[HEADER_LEN : HEADER_LEN + length]!r}")
    if msg_type != MSG_RESPONSE or length != RESPONSE_PAYLOAD_LEN or len(response) != RESPONSE_LEN:
        raise NoiseError(f"malformed handshake response (type {msg_type}, length {length})")
    s = init.state
    re = response[HEADER_LEN : HEADER_LEN + KEY_LEN]
    s.mix_hash(re)
    s.mix_dh(init.ephemeral.raw, re)
    k = s.mix_dh(init.machine.raw, re)
    s.decrypt_and_hash(k, response[HEADER_LEN + KEY_LEN :])
    k1, k2 = s.split()
    return Transport(CipherState(k1), CipherState(k2), init.server_public, init.version, s.h)


def respond(
    server: PrivateKey, initiation: bytes, ephemeral: PrivateKey | None = None
) -> tuple[bytes, Transport]:
    """Server side: check an initiation and build the response. Raises :class:`NoiseError`."""
    if len(initiation) != INITIATION_LEN:
        raise NoiseError(f"handshake initiation must be {INITIATION_LEN} bytes, got {len(initiation)}")
    version, msg_type, length = struct.unpack(">HBH", initiation[:INITIATION_HEADER_LEN])
    if msg_type != MSG_INITIATION:
        raise NoiseError(f"expected a handshake initiation (type 1), got type {msg_type}")
    if length != INITIATION_PAYLOAD_LEN:
        raise NoiseError(f"wrong handshake initiation length {length}")
    payload = initiation[INITIATION_HEADER_LEN:]
    ie = payload[:KEY_LEN]
    sealed_machine = payload[KEY_LEN : KEY_LEN + KEY_LEN + TAG_LEN]
    tag = payload[KEY_LEN + KEY_LEN + TAG_LEN :]
    s = SymmetricState()
    s.mix_hash(prologue(version))
    s.mix_hash(server.public)
    s.mix_hash(ie)
    k = s.mix_dh(server.raw, ie)
    machine_public = s.decrypt_and_hash(k, sealed_machine)
    k = s.mix_dh(server.raw, machine_public)
    s.decrypt_and_hash(k, tag)
    e = ephemeral or PrivateKey.generate()
    s.mix_hash(e.public)
    s.mix_dh(e.raw, ie)
    k = s.mix_dh(e.raw, machine_public)
    resp_tag = s.encrypt_and_hash(k, b"")
    k1, k2 = s.split()
    response = struct.pack(">BH", MSG_RESPONSE, RESPONSE_PAYLOAD_LEN) + e.public + resp_tag
    return response, Transport(CipherState(k2), CipherState(k1), machine_public, version, s.h)
