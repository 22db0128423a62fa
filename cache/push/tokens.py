"""Push tokens: the netrc password of a pusher. Only a hash of each is kept.

`harmonia-cache push-token create NAME` prints a new token once; the file holds its sha256
(a token is 256 random bits, so a plain hash is as strong as a slow one), the name and the date.
The server re-reads the file when it changes, so `revoke` applies at once, without a restart.
A request carries the token as the password of HTTP Basic auth (curl's netrc; any login).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

TOKEN_PREFIX = "hcp_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")


class TokenError(Exception):
    """A token store that cannot be read or written, or a bad token name."""


@dataclass(frozen=True, slots=True)
class TokenEntry:
    name: str
    sha256: str  # hex digest of the token
    created: float

    def __repr__(self) -> str:  # the digest is not secret, but it has no business in logs
        return f"TokenEntry(name={self.name!r}, created={self.created})"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise TokenError(
            f"token name {name[:80]!r}: use 1 to 64 letters, digits and . _ @ + - (starting with a letter or digit)"
        )
    return name


def basic_password(header: str | None) -> str | None:
    """The password of an `Authorization: Basic …` header, or None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _, sep, password = decoded.partition(":")
    return password if sep and password else None


def parse_store(text: str, source: str) -> list[TokenEntry]:
    try:
        doc = json.loads(text)
        entries = [
            TokenEntry(str(item["name"]), str(item["sha256"]), float(item["created"]))
            for item in doc["tokens"]
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise TokenError(f"{source}: not a push token file ({exc})") from exc
    return entries


def render_store(entries: list[TokenEntry]) -> str:
    doc = {
        "version": 1,
        "tokens": [{"name": e.name, "sha256": e.sha256, "created": e.created} for e in entries],
    }
    return json.dumps(doc, indent=2) + "\n"


def find_token(entries: list[TokenEntry], token: str) -> str | None:
    """The name of the entry whose hash matches; every entry is compared, in constant time each."""
    digest = token_digest(token)
    found: str | None = None
    for entry in entries:
        if hmac.compare_digest(entry.sha256, digest):
            found = entry.name
    return found


def _owner_of_nearest(directory: Path) -> tuple[int, int]:
    """uid and gid of `directory`, or of its nearest existing ancestor."""
    for candidate in (directory, *directory.parents):
        try:
            st = os.stat(candidate)
        except FileNotFoundError:
            continue
        return st.st_uid, st.st_gid
    return 0, 0


def _missing_dirs(directory: Path) -> list[Path]:
    return [d for d in (directory, *directory.parents) if not d.exists()]


class TokenStore:
    """The token file. Reads are cached until the file's (mtime, size, inode) changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._entries: list[TokenEntry] = []

    def entries(self) -> list[TokenEntry]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._entries = None, []
            return []
        except OSError as exc:
            raise TokenError(f"{self.path}: {exc.strerror}") from exc
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            try:
                text = self.path.read_text()
            except OSError as exc:
                raise TokenError(f"{self.path}: {exc.strerror}") from exc
            self._entries = parse_store(text, str(self.path))
            self._stamp = stamp
        return list(self._entries)

    def authenticate(self, authorization: str | None) -> str | None:
        """The token's name when the Authorization header carries a known token, else None."""
        password = basic_password(authorization)
        if password is None:
            return None
        return find_token(self.entries(), password)

    def _write(self, entries: list[TokenEntry]) -> None:
        directory = self.path.parent
        try:
            owner = _owner_of_nearest(directory)
            created = _missing_dirs(directory)
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = directory / f".{self.path.name}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(render_store(entries))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)  # an existing temporary file keeps its mode otherwise
            # root managing tokens for a service user (systemd's DynamicUser owns the state
            # directory): the file must stay readable by the server, so it takes that owner
            if os.geteuid() == 0 and owner != (0, 0):
                for path in (*created, tmp):
                    os.chown(path, *owner)
            os.replace(tmp, self.path)
        except OSError as exc:
            raise TokenError(f"cannot write {self.path}: {exc.strerror}") from exc

    def create(self, name: str) -> str:
        """A new token for `name` (printed once by the caller, never stored)."""
        check_name(name)
        entries = self.entries()
        if any(e.name == name for e in entries):
            raise TokenError(f"a token named {name!r} exists already; revoke it first")
        token = new_token()
        self._write([*entries, TokenEntry(name, token_digest(token), time.time())])
        return token

    def revoke(self, name: str) -> None:
        entries = self.entries()
        kept = [e for e in entries if e.name != name]
        if len(kept) == len(entries):
            raise TokenError(f"no token named {name!r}")
        self._write(kept)
