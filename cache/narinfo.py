"""Path metadata and the narinfo format, as Nix reads and writes it. Pure.

Field order follows Nix's own writer: StorePath, URL, Compression, FileHash, FileSize,
NarHash, NarSize, References, Deriver, Sig…, CA.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from .hashes import sha256_nix32
from .signing import Signer
from .storepath import hash_part_of


@dataclass(frozen=True, slots=True)
class PathInfo:
    """What the store knows of one valid path. `references` are full store paths."""

    path: str
    nar_hash: bytes  # raw sha256 digest
    nar_size: int
    references: tuple[str, ...] = ()
    deriver: str | None = None
    sigs: tuple[str, ...] = ()
    ca: str | None = None
    registration_time: int = 0

    @property
    def hash_part(self) -> str:
        return hash_part_of(self.path)


@dataclass(frozen=True, slots=True)
class NarLocation:
    """Where and how the NAR is offered: URL relative to the cache root, compression, file hash."""

    url: str
    compression: str = "none"
    file_hash: bytes | None = None
    file_size: int | None = None


def fingerprint(info: PathInfo) -> str:
    refs = ",".join(sorted(info.references))
    return f"1;{info.path};{sha256_nix32(info.nar_hash)};{info.nar_size};{refs}"


def signatures(info: PathInfo, signers: Iterable[Signer]) -> tuple[str, ...]:
    """The store's signatures, then one per configured key (replacing the store's of the same name)."""
    fresh = [s.sign(fingerprint(info)) for s in signers]
    names = {sig.split(":", 1)[0] for sig in fresh}
    kept = [sig for sig in info.sigs if sig.split(":", 1)[0] not in names]
    return (*kept, *fresh)


def _base(path: str) -> str:
    return path.rsplit("/", 1)[1]


@dataclass(frozen=True, slots=True)
class NarInfo:
    info: PathInfo
    location: NarLocation
    sigs: tuple[str, ...] = field(default=())

    def render(self) -> str:
        info, loc = self.info, self.location
        lines = [
            f"StorePath: {info.path}",
            f"URL: {loc.url}",
            f"Compression: {loc.compression}",
        ]
        if loc.file_hash is not None:
            lines.append(f"FileHash: {sha256_nix32(loc.file_hash)}")
        if loc.file_size is not None:
            lines.append(f"FileSize: {loc.file_size}")
        lines.append(f"NarHash: {sha256_nix32(info.nar_hash)}")
        lines.append(f"NarSize: {info.nar_size}")
        lines.append("References: " + " ".join(sorted(_base(r) for r in info.references)))
        if info.deriver:
            lines.append(f"Deriver: {_base(info.deriver)}")
        lines.extend(f"Sig: {sig}" for sig in self.sigs)
        if info.ca:
            lines.append(f"CA: {info.ca}")
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        """The `?json` form, shaped like `nix path-info --json` (plus the NAR's location)."""
        info, loc = self.info, self.location
        doc: dict[str, object] = {
            "path": info.path,
            "narHash": sha256_nix32(info.nar_hash),
            "narSize": info.nar_size,
            "references": sorted(info.references),
            "deriver": info.deriver,
            "registrationTime": info.registration_time,
            "signatures": list(self.sigs),
            "ca": info.ca,
            "url": loc.url,
            "compression": loc.compression,
        }
        if loc.file_hash is not None:
            doc["downloadHash"] = sha256_nix32(loc.file_hash)
            doc["downloadSize"] = loc.file_size
        return json.dumps(doc, indent=None, separators=(",", ":"))


def parse_narinfo(text: str) -> dict[str, list[str]]:
    """Loose parser (for tests and tools): each key to its values, in order."""
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if not sep:
            key, sep, value = line.partition(":")
            if not sep:
                raise ValueError(f"narinfo line without a colon: {line!r}")
        fields.setdefault(key, []).append(value)
    return fields


def cache_info(store_dir: str, priority: int, want_mass_query: bool = True) -> str:
    return f"StoreDir: {store_dir}\nWantMassQuery: {1 if want_mass_query else 0}\nPriority: {priority}\n"
