"""Nix's hash encodings: nix32 (Nix's own base-32), base16 and base64, and `sha256:` strings.

Pure functions only. Nix32 runs its alphabet from the *end* of the digest, so it is not RFC 4648.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib

NIX32_ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_NIX32_INDEX = {c: i for i, c in enumerate(NIX32_ALPHABET)}
SHA256_BYTES = 32


class HashFormatError(ValueError):
    """A hash string that is not in any form Nix writes."""


def nix32_length(nbytes: int) -> int:
    return (nbytes * 8 - 1) // 5 + 1


_FROM_RFC4648 = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", NIX32_ALPHABET.encode())


@functools.lru_cache(maxsize=65536)
def nix32_encode(digest: bytes) -> str:
    # Nix reads the digest as one little-endian number and prints its 5-bit groups, highest
    # first. RFC 4648 base32 prints the 5-bit groups of a big-endian number highest first too, so
    # the number padded to whole 40-bit blocks goes through b32encode (C, not a Python loop), the
    # leading zero groups are dropped, and the alphabet is swapped.
    length = nix32_length(len(digest))
    padded = -(-length // 8) * 8
    number = int.from_bytes(digest, "little")
    encoded = base64.b32encode(number.to_bytes(padded * 5 // 8, "big"))
    return encoded[padded - length :].translate(_FROM_RFC4648).decode()


def nix32_decode(text: str, nbytes: int) -> bytes:
    if len(text) != nix32_length(nbytes):
        raise HashFormatError(f"nix32 string of length {len(text)}, expected {nix32_length(nbytes)}")
    out = bytearray(nbytes)
    for n, ch in enumerate(reversed(text)):
        digit = _NIX32_INDEX.get(ch)
        if digit is None:
            raise HashFormatError(f"invalid nix32 character {ch!r}")
        bit = n * 5
        i, j = divmod(bit, 8)
        out[i] |= (digit << j) & 0xFF
        carry = digit >> (8 - j)
        if i + 1 < nbytes:
            out[i + 1] |= carry
        elif carry:
            raise HashFormatError("nix32 string has excess bits")
    return bytes(out)


def is_nix32(text: str) -> bool:
    return all(c in _NIX32_INDEX for c in text)


def parse_sha256(text: str) -> bytes:
    """Accept what Nix stores or prints: `sha256:` followed by base16, nix32 or base64, or bare base16."""
    body = text.removeprefix("sha256:")
    body = body.removeprefix("sha256-")  # SRI form
    if len(body) == 64:
        try:
            return bytes.fromhex(body)
        except ValueError as exc:
            raise HashFormatError(f"invalid base16 sha256 {text!r}") from exc
    if len(body) == nix32_length(SHA256_BYTES):
        return nix32_decode(body, SHA256_BYTES)
    if len(body) == 44:
        try:
            digest = base64.b64decode(body, validate=True)
        except binascii.Error as exc:
            raise HashFormatError(f"invalid base64 sha256 {text!r}") from exc
        if len(digest) == SHA256_BYTES:
            return digest
    raise HashFormatError(f"unrecognised sha256 hash {text!r}")


def sha256_nix32(digest: bytes) -> str:
    """`sha256:<nix32>`, the form narinfo files carry."""
    return "sha256:" + nix32_encode(digest)


def sha256_of(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
