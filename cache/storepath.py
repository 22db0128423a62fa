"""Store paths and the parts clients send us: hash parts, names, `/nix/store/<hash>-<name>`.

Everything a client puts in a URL passes through here before it reaches the store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HASH_PART_LEN = 32
_HASH_PART = re.compile(r"[0123456789abcdfghijklmnpqrsvwxyz]{32}")
# Nix's rule for names: these characters, at most 211 of them, not starting with a dot.
_NAME = re.compile(r"[A-Za-z0-9+\-._?=]{1,211}")


class StorePathError(ValueError):
    """Something that is not a valid store path, hash part or name."""


def is_hash_part(text: str) -> bool:
    return _HASH_PART.fullmatch(text) is not None


def check_hash_part(text: str) -> str:
    if not is_hash_part(text):
        raise StorePathError(f"not a store path hash: {text[:64]!r}")
    return text


def hash_part_of(path: str) -> str:
    """`/nix/store/<hash>-<name>` → `<hash>` (a path Nix or the store gave, not a client)."""
    return path.rsplit("/", 1)[-1][:HASH_PART_LEN]


def is_valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None and not name.startswith(".")


@dataclass(frozen=True, slots=True)
class StorePath:
    store_dir: str
    hash_part: str
    name: str

    @property
    def base_name(self) -> str:
        return f"{self.hash_part}-{self.name}"

    def __str__(self) -> str:
        return f"{self.store_dir}/{self.base_name}"

    @classmethod
    def parse(cls, path: str, store_dir: str) -> StorePath:
        prefix = store_dir.rstrip("/") + "/"
        if not path.startswith(prefix):
            raise StorePathError(f"path {path[:200]!r} is not in the store {store_dir!r}")
        return cls.parse_base_name(path[len(prefix) :], store_dir)

    @classmethod
    def parse_base_name(cls, base: str, store_dir: str) -> StorePath:
        if "/" in base:
            raise StorePathError(f"{base[:200]!r} is not a store path base name")
        hash_part, sep, name = base.partition("-")
        if not sep or not is_hash_part(hash_part) or not is_valid_name(name):
            raise StorePathError(f"{base[:200]!r} is not a store path base name")
        return cls(store_dir.rstrip("/"), hash_part, name)
