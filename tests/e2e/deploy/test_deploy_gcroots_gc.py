"""GC pinning against the real store: a pinned path (and its closure) survives collection, an
unpinned one does not.

Other tests share this store and run at the same time, so nothing here runs a full
`nix-store --gc`: the collector is asked to delete our own throwaway paths one by one with
`nix-store --delete PATH`, which applies the same liveness rules (roots under
/nix/var/nix/gcroots, referrers, runtime roots) and refuses a live path. See docs/deploy.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from cache import gcroots
from tests.support.nix import build, have_nix, nix_env, run

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not have_nix(), reason="Nix is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="writing GC roots and deleting paths needs root"),
]

HARMONIA_CACHE = str(Path(sys.executable).with_name("harmonia-cache"))


def throwaway_paths(env: dict[str, str], tag: str) -> tuple[str, str, str]:
    """Three fresh store paths: `dep`, `top` (refers to dep) and `loose`."""
    expr = f"""
      let
        mk = name: script: extra: builtins.derivation ({{
          inherit name;
          system = builtins.currentSystem;
          builder = "/bin/sh";
          args = [ "-c" script ];
        }} // extra);
        dep = mk "harmonia-gc-dep-{tag}" "echo {tag} > $out" {{ }};
      in [
        dep
        (mk "harmonia-gc-top-{tag}" "echo $dep > $out" {{ inherit dep; }})
        (mk "harmonia-gc-loose-{tag}" "echo loose {tag} > $out" {{ }})
      ]
    """
    dep, top, loose = build(expr, env)
    return dep, top, loose


def delete(path: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run(["nix-store", "--delete", path], env=env, timeout=120, check=False)


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HARMONIA_CACHE, *argv], capture_output=True, text=True, timeout=60, check=False)


def test_pinned_paths_survive_collection_and_unpinned_ones_do_not(tmp_path: Path) -> None:
    env = nix_env(tmp_path / "xdg")
    tag = uuid.uuid4().hex[:12]
    dep, top, loose = throwaway_paths(env, tag)
    root = gcroots.default_gcroots_dir() / gcroots.root_name(gcroots.parse_store_path(top))
    try:
        # through the real command line, as an operator would
        pinned = cli("pin", top)
        assert pinned.returncode == 0, pinned.stderr
        assert pinned.stdout == f"pinned {top} (root {root})\n"
        assert os.readlink(root) == top
        assert top in cli("pins").stdout.splitlines()

        # the collector refuses the pinned path and what it refers to ...
        for alive in (top, dep):
            refused = delete(alive, env)
            assert refused.returncode != 0, f"{alive} was deleted although pinned"
            assert "still alive" in refused.stderr
            assert Path(alive).exists()
        # ... and deletes the path that is not pinned
        deleted = delete(loose, env)
        assert deleted.returncode == 0, deleted.stderr
        assert not Path(loose).exists()

        unpinned = cli("unpin", top)
        assert unpinned.returncode == 0, unpinned.stderr
        assert not os.path.lexists(root)
        assert top not in cli("pins").stdout.splitlines()
        # once unpinned, both go
        for dead in (top, dep):
            gone = delete(dead, env)
            assert gone.returncode == 0, gone.stderr
            assert not Path(dead).exists()
    finally:
        if os.path.lexists(root):
            root.unlink()
        for p in (top, dep, loose):
            if Path(p).exists():
                delete(p, env)


def test_pin_refuses_a_path_that_is_not_in_the_store(tmp_path: Path) -> None:
    absent = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-harmonia-never-built"
    result = cli("pin", absent)
    assert result.returncode == 1
    assert "is not in the store" in result.stderr
    assert not os.path.lexists(gcroots.default_gcroots_dir() / f"{Path(absent).name}")
