import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cache.hashes import HashFormatError, nix32_decode, nix32_encode, parse_sha256, sha256_nix32


def test_known_vector() -> None:
    # `echo -n hello | nix hash file --type sha256 --base32 /dev/stdin`
    digest = hashlib.sha256(b"hello").digest()
    assert nix32_encode(digest) == "094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic"


def test_empty_digest_of_nar_hash_example() -> None:
    raw = bytes.fromhex("1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13")
    assert nix32_encode(raw) == "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"


@given(st.binary(min_size=1, max_size=64))
def test_roundtrip(data: bytes) -> None:
    assert nix32_decode(nix32_encode(data), len(data)) == data


@pytest.mark.parametrize(
    "text",
    [
        "sha256:1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13",
        "sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw",
        "1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13",
        "sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM=",
    ],
)
def test_parse_sha256_forms(text: str) -> None:
    assert sha256_nix32(parse_sha256(text)) == "sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"


@pytest.mark.parametrize("text", ["", "sha256:", "sha256:xyz", "e" * 52, "g" * 64, "sha256:" + "!" * 44])
def test_parse_sha256_rejects(text: str) -> None:
    with pytest.raises(HashFormatError):
        parse_sha256(text)


def test_nix32_rejects_bad_characters() -> None:
    with pytest.raises(HashFormatError):
        nix32_decode("e" * 52, 32)


def test_nix32_encode_matches_its_definition_for_every_length() -> None:
    # the definition: the digest as one little-endian number, its 5-bit groups printed highest first
    import random

    rng = random.Random(7)
    for size in range(0, 70):
        digest = bytes(rng.randrange(256) for _ in range(size))
        number = int.from_bytes(digest, "little")
        groups = (size * 8 - 1) // 5 + 1 if size else 0
        expected = "".join(
            "0123456789abcdfghijklmnpqrsvwxyz"[(number >> (5 * n)) & 31] for n in reversed(range(groups))
        )
        assert nix32_encode(digest) == expected
