"""Nix signing keys (`name:base64`) and narinfo signatures, with ed25519 from pynacl.

The secret key file holds libsodium's 64-byte layout (seed then public key), as
`nix-store --generate-binary-cache-key` writes it. Secrets never show up in a repr.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

import nacl.exceptions
import nacl.signing


class KeyFormatError(ValueError):
    """A key or signature that cannot be parsed."""


def _split(text: str, what: str) -> tuple[str, bytes]:
    name, sep, b64 = text.strip().partition(":")
    if not sep or not name:
        raise KeyFormatError(f"{what} is not in the form name:base64")
    try:
        raw = base64.b64decode(b64, validate=True)
    except binascii.Error as exc:
        raise KeyFormatError(f"{what} {name!r} has invalid base64") from exc
    return name, raw


@dataclass(frozen=True)
class PublicKey:
    name: str
    key: bytes

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        name, raw = _split(text, "public key")
        if len(raw) != 32:
            raise KeyFormatError(f"public key {name!r} has {len(raw)} bytes, expected 32")
        return cls(name, raw)

    def __str__(self) -> str:
        return f"{self.name}:{base64.b64encode(self.key).decode()}"

    def verify(self, fingerprint: str, signature: str) -> bool:
        """True when `signature` (`name:base64`) is this key's signature of the fingerprint."""
        try:
            name, sig = _split(signature, "signature")
        except KeyFormatError:
            return False
        if name != self.name or len(sig) != 64:
            return False
        try:
            nacl.signing.VerifyKey(self.key).verify(fingerprint.encode(), sig)
        except nacl.exceptions.BadSignatureError:
            return False
        return True


@dataclass(frozen=True)
class SecretKey:
    name: str
    _seed: bytes = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> SecretKey:
        name, raw = _split(text, "secret key")
        if len(raw) == 64:
            seed, public = raw[:32], raw[32:]
            if nacl.signing.SigningKey(seed).verify_key.encode() != public:
                raise KeyFormatError(f"secret key {name!r}: its public half does not match its seed")
        elif len(raw) == 32:
            seed = raw
        else:
            raise KeyFormatError(f"secret key {name!r} has {len(raw)} bytes, expected 64")
        return cls(name, seed)

    @classmethod
    def generate(cls, name: str) -> SecretKey:
        if not name or ":" in name or any(c.isspace() for c in name):
            raise KeyFormatError(f"key name {name!r} must be non-empty, without ':' or spaces")
        return cls(name, bytes(nacl.signing.SigningKey.generate()))

    def __repr__(self) -> str:
        return f"SecretKey(name={self.name!r}, <secret>)"

    def to_text(self) -> str:
        """The secret file's content. Only for writing the key file."""
        raw = self._seed + self.public_key().key
        return f"{self.name}:{base64.b64encode(raw).decode()}"

    def public_key(self) -> PublicKey:
        return PublicKey(self.name, nacl.signing.SigningKey(self._seed).verify_key.encode())

    def signer(self) -> Signer:
        return Signer(self.name, nacl.signing.SigningKey(self._seed))


class Signer:
    """A parsed key kept ready to sign: parsing per request costs real time."""

    __slots__ = ("_key", "name")

    def __init__(self, name: str, key: nacl.signing.SigningKey) -> None:
        self.name = name
        self._key = key

    def __repr__(self) -> str:
        return f"Signer(name={self.name!r})"

    def public_key(self) -> PublicKey:
        return PublicKey(self.name, self._key.verify_key.encode())

    def sign(self, fingerprint: str) -> str:
        sig = self._key.sign(fingerprint.encode()).signature
        return f"{self.name}:{base64.b64encode(sig).decode()}"
