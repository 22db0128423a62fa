"""GC pinning: keep what a deployment must serve alive across `nix-store --gc`.

`harmonia-cache pin PATH…` registers one root per store path under the store's roots directory,
`/nix/var/nix/gcroots/harmonia/` by default; `unpin PATH…` removes them; `pins` lists them.

A root is a symlink `<gcroots_dir>/<hash>-<name>` pointing at `/nix/store/<hash>-<name>`. Nix's
garbage collector walks `/nix/var/nix/gcroots` recursively and treats every symlink into the store
as a root, so the pinned path and its whole closure survive collection. The root's name is the
store path's base name: unique, reversible, and readable in `ls`.

Rules, in order of the code below:
- the pure helpers (`parse_store_path`, `root_name`) never touch the file system;
- every path given is checked before anything is changed, so a bad argument changes nothing;
- a root is created atomically (a symlink under a temporary name, then `rename`), so a concurrent GC
  sees either no root or a complete one;
- a root whose link points elsewhere than its name says is never removed or overwritten silently.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from cache.storepath import StorePath

DEFAULT_STORE_DIR = "/nix/store"
DEFAULT_STATE_DIR = "/nix/var/nix"
ROOTS_SUBDIR = "harmonia"
# Nix's base-32 digits (no e, o, u, t) and its rule for names (not starting with a dot)
_BASE_NAME = re.compile(r"([0-9a-df-np-sv-z]{32})-((?!\.)[A-Za-z0-9+\-._?=]{1,211})")


class PinError(Exception):
    """A pin, unpin or listing that cannot be done; the message says what and why."""


def default_store_dir() -> str:
    return os.environ.get("NIX_STORE_DIR", DEFAULT_STORE_DIR)


def default_gcroots_dir() -> Path:
    state = os.environ.get("NIX_STATE_DIR", DEFAULT_STATE_DIR)
    return Path(state) / "gcroots" / ROOTS_SUBDIR


# ---------------------------------------------------------------------------------------------
# Pure helpers


def parse_store_path(path: str, store_dir: str = DEFAULT_STORE_DIR) -> StorePath:
    """The store path `path` names exactly, or `PinError` saying why it is not one.

    A path inside a store path (`/nix/store/<hash>-x/bin/y`) is refused rather than widened:
    pinning must say exactly what it keeps.
    """
    store_dir = store_dir.rstrip("/") or "/"
    normalized = os.path.normpath(path) if path else path
    prefix = store_dir + "/"
    if normalized.startswith(prefix):
        rest = normalized[len(prefix) :]
        if "/" in rest:
            top = rest.split("/", 1)[0]
            raise PinError(f"{path!r} is inside the store path {prefix}{top}; pin the store path itself")
    base = normalized[len(prefix) :] if normalized.startswith(prefix) else None
    m = _BASE_NAME.fullmatch(base) if base is not None else None
    if m is None:
        raise PinError(f"not a store path: {path[:200]!r} is not {prefix}<32-character hash>-<name>")
    return StorePath(store_dir, m.group(1), m.group(2))


def root_name(store_path: StorePath) -> str:
    """The file name of the root that pins `store_path`: its base name `<hash>-<name>`."""
    return store_path.base_name


# ---------------------------------------------------------------------------------------------
# Operations on the roots directory


@dataclass(frozen=True, slots=True)
class Pin:
    """One root under the roots directory."""

    root: Path
    store_path: str
    exists: bool  # whether the store path is present now (a dangling root pins nothing)

    def to_json(self) -> dict[str, object]:
        return {"root": str(self.root), "storePath": self.store_path, "exists": self.exists}


@dataclass(frozen=True, slots=True)
class PinResult:
    pin: Pin
    changed: bool  # False if the root was already there (pin) or already gone (unpin)


def resolve(path: str, store_dir: str = DEFAULT_STORE_DIR) -> StorePath:
    """Like `parse_store_path`, but a symlink outside the store (`./result`) is followed first."""
    store_dir = store_dir.rstrip("/") or "/"
    if not path:
        raise PinError("empty path")
    if not os.path.normpath(path).startswith(store_dir + "/") and os.path.islink(path):
        target = os.path.realpath(path)
        if not target.startswith(store_dir + "/"):
            raise PinError(f"{path!r} resolves to {target!r}, outside the store {store_dir}")
        # `result` links point at the store path itself; realpath may have gone further into it
        top = target[len(store_dir) + 1 :].split("/", 1)[0]
        path = f"{store_dir}/{top}"
    return parse_store_path(path, store_dir)


def _check_exists(sp: StorePath) -> None:
    if not os.path.lexists(str(sp)):
        raise PinError(f"{sp} is not in the store (build or copy it first)")


def _read_root(root: Path) -> str | None:
    try:
        return os.readlink(root)
    except (FileNotFoundError, NotADirectoryError):
        return None  # absent (a broken roots directory is reported when it is created)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # a regular file or directory where a root should be
            raise PinError(f"{root} exists but is not a symlink; remove it by hand") from exc
        raise PinError(f"cannot read {root}: {exc.strerror}") from exc


def pin(
    paths: Iterable[str],
    *,
    gcroots_dir: Path | None = None,
    store_dir: str | None = None,
) -> list[PinResult]:
    """Register a root for every path; all paths are checked before any root is written."""
    gcroots = gcroots_dir if gcroots_dir is not None else default_gcroots_dir()
    store = store_dir if store_dir is not None else default_store_dir()
    parsed = [resolve(p, store) for p in paths]
    if not parsed:
        raise PinError("nothing to pin: give at least one store path")
    for sp in parsed:
        _check_exists(sp)
        current = _read_root(gcroots / root_name(sp))
        if current is not None and current != str(sp):
            raise PinError(f"{gcroots / root_name(sp)} points at {current!r}, not {sp}; remove it by hand")
    try:
        gcroots.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise PinError(f"cannot create the roots directory {gcroots}: {exc.strerror}") from exc
    results: list[PinResult] = []
    for sp in dict.fromkeys(parsed):  # each path once, in the order given
        root = gcroots / root_name(sp)
        if _read_root(root) == str(sp):
            results.append(PinResult(Pin(root, str(sp), True), changed=False))
            continue
        tmp = gcroots / f".{root.name}.{os.getpid()}.tmp"
        try:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            os.symlink(str(sp), tmp)
            os.replace(tmp, root)
        except OSError as exc:
            raise PinError(f"cannot write the root {root}: {exc.strerror}") from exc
        results.append(PinResult(Pin(root, str(sp), True), changed=True))
    return results


def unpin(
    paths: Iterable[str],
    *,
    gcroots_dir: Path | None = None,
    store_dir: str | None = None,
    missing_ok: bool = False,
) -> list[PinResult]:
    """Remove the roots of the given paths; without `missing_ok`, a path not pinned is an error.

    The store path itself need not exist any more (a dangling root can be removed).
    """
    gcroots = gcroots_dir if gcroots_dir is not None else default_gcroots_dir()
    store = store_dir if store_dir is not None else default_store_dir()
    parsed = list(dict.fromkeys(parse_store_path(p, store) for p in paths))
    if not parsed:
        raise PinError("nothing to unpin: give at least one store path")
    for sp in parsed:
        root = gcroots / root_name(sp)
        current = _read_root(root)
        if current is None and not missing_ok:
            raise PinError(f"{sp} is not pinned (no root {root})")
        if current is not None and current != str(sp):
            raise PinError(f"{root} points at {current!r}, not {sp}; remove it by hand")
    results: list[PinResult] = []
    for sp in parsed:
        root = gcroots / root_name(sp)
        exists = os.path.lexists(str(sp))
        try:
            os.unlink(root)
            changed = True
        except FileNotFoundError:
            changed = False
        except OSError as exc:
            raise PinError(f"cannot remove the root {root}: {exc.strerror}") from exc
        results.append(PinResult(Pin(root, str(sp), exists), changed=changed))
    return results


def list_pins(*, gcroots_dir: Path | None = None, store_dir: str | None = None) -> list[Pin]:
    """Every root in the roots directory that is ours (named after the store path it points at)."""
    gcroots = gcroots_dir if gcroots_dir is not None else default_gcroots_dir()
    store = store_dir if store_dir is not None else default_store_dir()
    try:
        entries = sorted(os.scandir(gcroots), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise PinError(f"cannot read the roots directory {gcroots}: {exc.strerror}") from exc
    pins: list[Pin] = []
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_symlink():
            continue
        target = os.readlink(entry.path)
        try:
            sp = parse_store_path(target, store)
        except PinError:
            continue  # not a root we made; leave it alone and unlisted
        if root_name(sp) != entry.name:
            continue
        pins.append(Pin(Path(entry.path), str(sp), os.path.lexists(target)))
    return pins


# ---------------------------------------------------------------------------------------------
# Command line: `harmonia-cache pin|unpin|pins`


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so `run_pins_command` returns a status."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.format_usage()}{self.prog}: error: {message}")


class _UsageError(Exception):
    pass


def _parser() -> _ArgumentParser:
    common = _ArgumentParser(add_help=False)
    common.add_argument(
        "--gcroots-dir",
        type=Path,
        default=None,
        help="directory of the roots (default: $NIX_STATE_DIR/gcroots/harmonia, "
        "i.e. /nix/var/nix/gcroots/harmonia)",
    )
    common.add_argument("--store-dir", default=None, help="the store (default: $NIX_STORE_DIR or /nix/store)")
    parser = _ArgumentParser(
        prog="harmonia-cache",
        description="Pin store paths so that garbage collection keeps them served.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)
    p = sub.add_parser("pin", parents=[common], help="register a GC root for each store path")
    p.add_argument("paths", nargs="+", metavar="PATH", help="store path (or a link to one)")
    u = sub.add_parser("unpin", parents=[common], help="remove the GC root of each store path")
    u.add_argument("paths", nargs="+", metavar="PATH", help="store path")
    u.add_argument("--missing-ok", action="store_true", help="a path that is not pinned is not an error")
    ls = sub.add_parser("pins", parents=[common], help="list the pinned store paths")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    return parser


def run_pins_command(argv: Sequence[str]) -> int:
    """Run `pin PATH…`, `unpin PATH…` or `pins`; return the exit status.

    0: done; 1: refused or failed (nothing changed if a path was invalid); 2: usage error.
    """
    try:
        args = _parser().parse_args(list(argv))
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    gcroots: Path | None = args.gcroots_dir
    store: str | None = args.store_dir
    try:
        if args.command == "pin":
            for r in pin(args.paths, gcroots_dir=gcroots, store_dir=store):
                state = "pinned" if r.changed else "already pinned"
                print(f"{state} {r.pin.store_path} (root {r.pin.root})")
        elif args.command == "unpin":
            for r in unpin(args.paths, gcroots_dir=gcroots, store_dir=store, missing_ok=args.missing_ok):
                state = "unpinned" if r.changed else "was not pinned"
                print(f"{state} {r.pin.store_path}")
        else:
            pins = list_pins(gcroots_dir=gcroots, store_dir=store)
            if args.json:
                print(json.dumps([p.to_json() for p in pins], indent=2))
            else:
                for p in pins:
                    print(p.store_path if p.exists else f"{p.store_path} (missing from the store)")
    except PinError as exc:
        print(f"harmonia-cache {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0
