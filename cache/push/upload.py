"""An uploaded narinfo: parsed strictly and checked against the URL and the trusted keys. Pure.

Each refusal says whose fault it is with the status to answer (`UploadRefused`): a narinfo that
cannot be read is 400, one not signed by a trusted key 403.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..hashes import HashFormatError, nix32_decode, parse_sha256
from ..narinfo import PathInfo, fingerprint
from ..signing import PublicKey
from ..storepath import StorePath, StorePathError

MAX_NARINFO_BYTES = 1 << 20
COMPRESSIONS = {"none": ".nar", "xz": ".nar.xz", "zstd": ".nar.zst", "bzip2": ".nar.bz2"}
# what `nix copy` PUTs: nar/<nix32 sha256 of the file>.nar[.xz|.zst|.bz2]
_NAR_NAME = re.compile(r"([0123456789abcdfghijklmnpqrsvwxyz]{52})(\.nar(?:\.xz|\.zst|\.bz2)?)")


class UploadRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class NarName:
    """The file part of a NAR URL: its file hash and the compression its extension says."""

    file_hash: bytes
    extension: str

    @property
    def compression(self) -> str:
        return next(c for c, ext in COMPRESSIONS.items() if ext == self.extension)

    @property
    def name(self) -> str:
        from ..hashes import nix32_encode

        return nix32_encode(self.file_hash) + self.extension


def parse_nar_name(name: str) -> NarName | None:
    m = _NAR_NAME.fullmatch(name)
    if m is None:
        return None
    try:
        return NarName(nix32_decode(m.group(1), 32), m.group(2))
    except HashFormatError:
        return None


@dataclass(frozen=True, slots=True)
class UploadedNarInfo:
    info: PathInfo  # references and deriver as full store paths
    nar: NarName
    compression: str
    file_size: int | None

    @property
    def hash_part(self) -> str:
        return self.info.hash_part


def _one(fields: dict[str, list[str]], key: str) -> str:
    values = fields.get(key)
    if not values:
        raise UploadRefused(400, f"the narinfo has no {key}")
    if len(values) > 1:
        raise UploadRefused(400, f"the narinfo has {key} {len(values)} times")
    return values[0]


def _size(text: str, key: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise UploadRefused(400, f"the narinfo's {key} is not a number: {text[:40]!r}")
    return int(text)


def parse_uploaded(body: bytes, hash_part: str, store_dir: str) -> UploadedNarInfo:
    """Parse a narinfo PUT to `<hash_part>.narinfo`; refuse anything Nix would not have written."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UploadRefused(400, "the narinfo is not UTF-8 text") from exc
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line:
            continue
        key, sep, value = line.partition(": ")
        if not sep:
            key, sep, value = line.partition(":")
            if not sep:
                raise UploadRefused(400, f"narinfo line without 'Key: value': {line[:80]!r}")
        fields.setdefault(key, []).append(value)
    try:
        path = StorePath.parse(_one(fields, "StorePath"), store_dir)
    except StorePathError as exc:
        raise UploadRefused(400, f"StorePath: {exc}") from exc
    if path.hash_part != hash_part:
        raise UploadRefused(400, f"StorePath {path} does not match the narinfo's name {hash_part}.narinfo")
    url = _one(fields, "URL")
    nar = parse_nar_name(url.removeprefix("nar/")) if url.startswith("nar/") else None
    if nar is None:
        raise UploadRefused(400, f"URL {url[:120]!r} is not nar/<filehash>.nar[.xz|.zst|.bz2]")
    compression = fields.get("Compression", ["bzip2"])[0]
    if compression not in COMPRESSIONS:
        raise UploadRefused(400, f"Compression {compression[:40]!r} is not one of {', '.join(COMPRESSIONS)}")
    if COMPRESSIONS[compression] != nar.extension:
        raise UploadRefused(
            400, f"Compression {compression} does not match the URL's extension {nar.extension}"
        )
    if "FileHash" in fields:
        try:
            if parse_sha256(_one(fields, "FileHash")) != nar.file_hash:
                raise UploadRefused(400, "FileHash differs from the hash in the URL")
        except HashFormatError as exc:
            raise UploadRefused(400, f"FileHash: {exc}") from exc
    file_size = _size(_one(fields, "FileSize"), "FileSize") if "FileSize" in fields else None
    try:
        nar_hash = parse_sha256(_one(fields, "NarHash"))
    except HashFormatError as exc:
        raise UploadRefused(400, f"NarHash: {exc}") from exc
    nar_size = _size(_one(fields, "NarSize"), "NarSize")
    if nar_size == 0:
        raise UploadRefused(400, "NarSize is 0")
    references: list[str] = []
    for base in " ".join(fields.get("References", [])).split():
        try:
            references.append(str(StorePath.parse_base_name(base, store_dir)))
        except StorePathError as exc:
            raise UploadRefused(400, f"References: {exc}") from exc
    deriver: str | None = None
    if "Deriver" in fields:
        base = _one(fields, "Deriver")
        if base and base != "unknown-deriver":
            try:
                deriver = str(StorePath.parse_base_name(base, store_dir))
            except StorePathError as exc:
                raise UploadRefused(400, f"Deriver: {exc}") from exc
    ca = _one(fields, "CA") if "CA" in fields else None
    if ca is not None and not (ca.startswith("fixed:") or ca.startswith("text:")):
        raise UploadRefused(400, f"CA {ca[:80]!r} is not fixed:… or text:…")
    info = PathInfo(
        path=str(path),
        nar_hash=nar_hash,
        nar_size=nar_size,
        references=tuple(sorted(set(references))),
        deriver=deriver,
        sigs=tuple(fields.get("Sig", [])),
        ca=ca or None,
    )
    return UploadedNarInfo(info, nar, compression, file_size)


def check_signed(info: PathInfo, trusted: tuple[PublicKey, ...]) -> list[str]:
    """The signatures of `info` made by a trusted key (at least one), else 403 naming the keys."""
    wanted = fingerprint(info)
    good = [sig for sig in info.sigs if any(key.verify(wanted, sig) for key in trusted)]
    if good:
        return good
    names = ", ".join(k.name for k in trusted) or "(none: [push] trusted_keys is empty)"
    if not info.sigs:
        raise UploadRefused(
            403,
            f"{info.path} is not signed; sign it with one of these keys: {names} (nix copy --to '…?secret-key=FILE')",
        )
    by = ", ".join(sorted({s.split(":", 1)[0] for s in info.sigs}))
    raise UploadRefused(
        403,
        f"{info.path} has no valid signature by a trusted key: signed by {by}, expected one of: {names}",
    )
