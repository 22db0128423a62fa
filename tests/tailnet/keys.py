"""Curve25519 keys and their typed text forms (``mkey:``, ``nodekey:``, ``discokey:``, ``chalpub:``).

Pure code: no sockets, no trio. Tailscale writes a public key as ``<prefix>:<64 hex digits>``; the
prefix says what the key is for, and a key of the wrong kind is refused rather than guessed at.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base

KEY_LEN = 32

MACHINE = "mkey"
NODE = "nodekey"
DISCO = "discokey"
CHALLENGE = "chalpub"


class KeyError_(ValueError):
    """A key in text form that cannot be parsed (the peer's fault)."""


def parse_public(text: object, prefix: str) -> bytes:
    """Parse ``<prefix>:<hex>`` into 32 raw bytes, or raise :class:`KeyError_` saying why."""
    if not isinstance(text, str):
        raise KeyError_(f"expected a {prefix}: key as a string, got {type(text).__name__}")
    head, sep, tail = text.partition(":")
    if not sep or head != prefix:
        raise KeyError_(f"expected a {prefix}: key, got {text[:24]!r}")
    if len(tail) != 2 * KEY_LEN:
        raise KeyError_(f"{prefix}: key must have {2 * KEY_LEN} hex digits, got {len(tail)}")
    try:
        return bytes.fromhex(tail)
    except ValueError:
        raise KeyError_(f"{prefix}: key is not hexadecimal") from None


def format_public(raw: bytes, prefix: str) -> str:
    if len(raw) != KEY_LEN:
        raise ValueError(f"a public key has {KEY_LEN} bytes, got {len(raw)}")
    return f"{prefix}:{raw.hex()}"


def x25519(private: bytes, public: bytes) -> bytes:
    """The X25519 shared secret; refuses low-order points (an all-zero result)."""
    try:
        return bytes(crypto_scalarmult(private, public))
    except Exception as exc:  # nacl raises RuntimeError on an all-zero result
        raise KeyError_("X25519 with a low-order public key") from exc


@dataclass(frozen=True, repr=False)
class PrivateKey:
    """A Curve25519 private key; its repr never shows the secret."""

    raw: bytes

    @classmethod
    def generate(cls) -> PrivateKey:
        return cls(secrets.token_bytes(KEY_LEN))

    @property
    def public(self) -> bytes:
        return bytes(crypto_scalarmult_base(self.raw))

    def __repr__(self) -> str:
        return f"PrivateKey(public={self.public.hex()[:16]}…)"

    def to_hex(self) -> str:
        return self.raw.hex()

    @classmethod
    def from_hex(cls, text: str) -> PrivateKey:
        raw = bytes.fromhex(text)
        if len(raw) != KEY_LEN:
            raise ValueError("a private key has 32 bytes")
        return cls(raw)
