"""Signing keys on disk: reading them safely, generating them in Nix's formats."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .signing import KeyFormatError, PublicKey, SecretKey


class KeyFileError(Exception):
    """A key file that cannot be used; the message says how to fix it."""


def read_secret_key(path: Path) -> SecretKey:
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise KeyFileError(f"signing key {path}: no such file") from exc
    except PermissionError as exc:
        raise KeyFileError(f"signing key {path}: permission denied for uid {os.getuid()}") from exc
    # systemd credentials ($CREDENTIALS_DIRECTORY) are private to the service already
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO) and not str(path).startswith(
        os.environ.get("CREDENTIALS_DIRECTORY") or "\0"
    ):
        raise KeyFileError(
            f"signing key {path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"fix it with: chmod 600 {path}"
        )
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"signing key {path}: cannot read it: {exc}") from exc
    try:
        return SecretKey.parse(text)
    except KeyFormatError as exc:
        raise KeyFileError(f"signing key {path}: {exc}") from exc


def read_public_key(path: Path) -> PublicKey:
    try:
        return PublicKey.parse(path.read_text())
    except OSError as exc:
        raise KeyFileError(f"public key {path}: {exc.strerror}") from exc
    except KeyFormatError as exc:
        raise KeyFileError(f"public key {path}: {exc}") from exc


def write_key_pair(name: str, secret_file: Path, public_file: Path) -> PublicKey:
    key = SecretKey.generate(name)
    for target in (secret_file, public_file):
        if target.exists():
            raise KeyFileError(f"{target} exists already; refusing to overwrite a key")
    secret_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.to_text())
    public = key.public_key()
    public_file.parent.mkdir(parents=True, exist_ok=True)
    public_file.write_text(str(public))
    return public
