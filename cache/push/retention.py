"""Retention roots: a pushed path stays alive for `retention_days` after its last push.

A root is a symlink `<state>/push/roots/<hash>-<name>` to the store path, registered with the
daemon as an indirect GC root (`AddIndirectRoot`, allowed for untrusted users: the daemon links
`gcroots/auto/…` to it). The link's own mtime is the time of the push, so the expiry needs no
other record; a new push replaces the link (a fresh mtime). A periodic sweep removes expired
links; the daemon's dangling `auto` link is cleaned by its next GC.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..storepath import StorePath, StorePathError


@dataclass(frozen=True, slots=True)
class Root:
    link: Path
    store_path: str
    pushed: float  # mtime of the link

    def expires(self, retention_seconds: float) -> float:
        return self.pushed + retention_seconds


def root_link(roots_dir: Path, store_path: str) -> Path:
    return roots_dir / store_path.rsplit("/", 1)[1]


def make_root(roots_dir: Path, store_path: str) -> Path:
    """Create or renew the root of `store_path` atomically (a GC sees the old link or the new)."""
    roots_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    link = root_link(roots_dir, store_path)
    tmp = roots_dir / f".{link.name}.{secrets.token_hex(8)}.tmp"  # pushes of one path may race
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(store_path, tmp)
    os.replace(tmp, link)
    return link


def read_root(link: Path, store_dir: str) -> Root | None:
    """The root at `link` if it is one of ours (named after the store path it points at)."""
    try:
        target = os.readlink(link)
        st = os.lstat(link)
    except OSError:
        return None
    try:
        parsed = StorePath.parse(target, store_dir)
    except StorePathError:
        return None
    if parsed.base_name != link.name:
        return None
    return Root(link, target, st.st_mtime)


def list_roots(roots_dir: Path, store_dir: str) -> list[Root]:
    try:
        names = sorted(os.listdir(roots_dir))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if name.startswith("."):
            continue
        root = read_root(roots_dir / name, store_dir)
        if root is not None:
            found.append(root)
    return found


def is_retained(
    roots_dir: Path, store_path: str, store_dir: str, retention_seconds: float, now: float
) -> bool:
    root = read_root(root_link(roots_dir, store_path), store_dir)
    return root is not None and root.store_path == store_path and root.expires(retention_seconds) > now


def sweep(roots_dir: Path, store_dir: str, retention_seconds: float, now: float) -> list[Root]:
    """Remove every expired root; the removed ones are returned (for the log)."""
    removed = []
    for root in list_roots(roots_dir, store_dir):
        if root.expires(retention_seconds) <= now:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(root.link)
            removed.append(root)
    return removed


def sweep_files(directory: Path, max_age: float, now: float) -> int:
    """Remove files older than `max_age` (abandoned uploads); how many were removed."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if (
                entry.is_file(follow_symlinks=False)
                and entry.stat(follow_symlinks=False).st_mtime + max_age <= now
            ):
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            continue
    return removed
