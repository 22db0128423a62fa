"""The benchmark's closure, built in the real store without nixpkgs, and its static export."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cache.hashes import parse_sha256

SMALL_COUNT = 300
SIZES_MB = (10, 100, 200)

# seq output compresses about 6:1 with zstd, like typical binaries and text in a closure
_EXPR = """
let
  mk = name: script: extra: builtins.derivation ({
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  } // extra);
  # roughly `mb` megabytes of decimal numbers, one a line
  sized = mb: mk "bench-${toString mb}mb" "/usr/bin/seq 1 ${toString (mb * 117000)} > $out" {};
  small = i: prev: mk "bench-small-${toString i}" ''
    /bin/mkdir -p $out/share
    /bin/echo "path ${toString i} after $prev" > $out/share/info
    /usr/bin/seq 1 ${toString (50 + i * 7)} > $out/share/data
  '' { inherit prev; };
  chain = builtins.foldl' (acc: i: acc ++ [ (small i (if acc == [] then "none" else builtins.elemAt acc (i - 1))) ])
    [] (builtins.genList (x: x) COUNT);
in { sized = map sized [ SIZES ]; small = chain; }
"""


@dataclass(frozen=True)
class Closure:
    sized: dict[int, str]  # MB -> store path
    small: list[str]

    @property
    def big(self) -> str:
        return self.sized[max(self.sized)]

    @property
    def all(self) -> list[str]:
        return [*self.sized.values(), *self.small]


def nix_env(state: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["XDG_CACHE_HOME"] = str(state / "xdg-cache")
    env["NIX_CONFIG"] = "experimental-features = nix-command\nsubstituters =\n"
    return env


def expression(count: int = SMALL_COUNT, sizes: tuple[int, ...] = SIZES_MB) -> str:
    return _EXPR.replace("COUNT", str(count)).replace("SIZES", " ".join(map(str, sizes)))


def build_closure(state: Path, count: int = SMALL_COUNT, sizes: tuple[int, ...] = SIZES_MB) -> Closure:
    env = nix_env(state)
    expr = expression(count, sizes)
    sized = subprocess.run(
        ["nix-build", "--no-out-link", "-E", f"({expr}).sized"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    ).stdout.split()
    small = subprocess.run(
        ["nix-build", "--no-out-link", "-E", f"({expr}).small"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    ).stdout.split()
    return Closure(dict(zip(sizes, sized, strict=True)), small)


def export(closure: Closure, target: Path, state: Path) -> None:
    """`nix copy --to file://…?compression=none`: the reference server's document root."""
    if (target / "nix-cache-info").exists():
        return
    subprocess.run(
        ["nix", "copy", "--to", f"file://{target}?compression=none", *closure.all],
        env=nix_env(state),
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )


def _path_info(path: str, state: Path) -> dict[str, object]:
    out = subprocess.run(
        ["nix", "path-info", "--json", path],
        env=nix_env(state),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    info = json.loads(out)
    found: dict[str, object] = info[0] if isinstance(info, list) else info[path]
    return found


def nar_size(path: str, state: Path) -> int:
    return int(str(_path_info(path, state)["narSize"]))


def nar_hash(path: str, state: Path) -> bytes:
    return parse_sha256(str(_path_info(path, state)["narHash"]))


_FRESH_EXPR = """
let
  mk = name: script: extra: builtins.derivation ({
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  } // extra);
  small = i: prev: mk "fresh-SALT-small-${toString i}" ''
    /bin/mkdir -p $out/share
    /bin/echo "path ${toString i} after $prev" > $out/share/info
    /usr/bin/seq 1 ${toString (50 + i * 7)} > $out/share/data
  '' { inherit prev; };
  chain = builtins.foldl' (acc: i: acc ++ [ (small i (if acc == [] then "none" else builtins.elemAt acc (i - 1))) ])
    [] (builtins.genList (x: x) COUNT);
in {
  big = mk "fresh-SALT-MBmb" "/usr/bin/seq SALTNUM $((SALTNUM + MB * 117000)) > $out" {};
  published = mk "fresh-SALT-MBmb-published" "/usr/bin/seq $((SALTNUM + 1)) $((SALTNUM + 1 + MB * 117000)) > $out" {};
  top = mk "fresh-SALT-top" "/bin/echo ${builtins.elemAt chain (COUNT - 1)} > $out" {};
}
"""


@dataclass(frozen=True)
class Fresh:
    """Paths built a moment ago: two big compressible ones (one fetched at once, one once every
    server has it), and the top of a closure of small ones."""

    big: str
    published: str
    top: str
    closure_size: int  # paths in the top's closure


def _fresh_expr(tag: str, big_mb: int, small_count: int) -> str:
    salt = str(abs(hash(tag)) % 10**9)
    return (
        _FRESH_EXPR.replace("SALTNUM", salt)
        .replace("SALT", f"{tag}")
        .replace("COUNT", str(small_count))
        .replace("MB", str(big_mb))
    )


# what this process built anew: unique paths nothing else uses, about 3 GB a full run (removed at its end)
FRESH_BUILT: list[str] = []


def _build(state: Path, expr: str, attrs: list[str]) -> list[str]:
    listed = " ".join(f"x.{a}" for a in attrs)
    built = subprocess.run(
        ["nix-build", "--no-out-link", "-E", f"let x = {expr}; in [ {listed} ]"],
        env=nix_env(state),
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    ).stdout.split()
    FRESH_BUILT.extend(built)
    return built


def _nix_store(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nix-store", *args], env=nix_env(state), capture_output=True, text=True, check=False, timeout=600
    )


def requisites(paths: list[str], state: Path) -> list[str]:
    return _nix_store(state, "--query", "--requisites", *paths).stdout.split()


def remove_fresh(state: Path) -> list[str]:
    """Deletes what `FRESH_BUILT` lists from the store, with its closures and derivations, one
    built path at a time (a closure's argument list stays short). Paths built anew are unrooted
    and unshared, so nothing else goes; the paths that could not be deleted are returned."""
    kept: list[str] = []
    while FRESH_BUILT:
        path = FRESH_BUILT.pop()
        derivers = [
            d for d in _nix_store(state, "--query", "--deriver", path).stdout.split() if d.endswith(".drv")
        ]
        # outputs first: a derivation stays alive while its outputs do
        for group in (requisites([path], state), requisites(derivers, state) if derivers else []):
            if group and _nix_store(state, "--delete", *group).returncode != 0:
                kept.append(path)
                break
    return kept


def build_fresh(state: Path, tag: str, big_mb: int, small_count: int) -> Fresh:
    """Builds new paths nobody has fetched (their names carry `tag`): the published path and the
    closure first, then the big path alone, so that it was registered a moment ago when this
    returns (a fetch started now finds no compressed copy)."""
    expr = _fresh_expr(tag, big_mb, small_count)
    published, top = _build(state, expr, ["published", "top"])
    (big,) = _build(state, expr, ["big"])
    return Fresh(big, published, top, small_count + 1)


def build_fresh_published(state: Path, tag: str, big_mb: int, small_count: int) -> tuple[str, str]:
    """Only a new published path and a new closure (its top): the shaped phase's extra fetches."""
    published, top = _build(state, _fresh_expr(tag, big_mb, small_count), ["published", "top"])
    return published, top


def build_fresh_closure(state: Path, tag: str, small_count: int) -> str:
    """Only a new closure of small paths (its top)."""
    return _build(state, _fresh_expr(tag, 1, small_count), ["top"])[0]


def export_to(paths: list[str], target: Path, compression: str, state: Path) -> None:
    """`nix copy --to file://…?compression=…`: a static cache Caddy serves (its closure included)."""
    subprocess.run(
        ["nix", "copy", "--to", f"file://{target}?compression={compression}", *paths],
        env=nix_env(state),
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
