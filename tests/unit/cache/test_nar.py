"""The NAR encoder and `.ls` listings, judged by `nix-store --dump` on the same trees."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache.nar import FileRegion, listing, nar_bytes, nar_segments, slice_segments

needs_nix = pytest.mark.skipif(shutil.which("nix-store") is None, reason="nix-store is not installed")


def nix_dump(path: Path) -> bytes:
    return subprocess.run(
        ["nix-store", "--dump", str(path)], capture_output=True, check=True, timeout=60
    ).stdout


def make_tree(root: Path) -> None:
    (root / "dir" / "empty-dir").mkdir(parents=True)
    (root / "empty").write_bytes(b"")
    (root / "exe").write_bytes(b"#!/bin/sh\n")
    (root / "exe").chmod(0o755)
    (root / "big").write_bytes(os.urandom(300_000))
    (root / "dir" / "ünïcödé-名前").write_text("u")
    for name in ["B", "a", "_", "Z", "0", "aa", "a.b", "A", "ä", "é", "-", "~", "a b"]:
        (root / "dir" / name).write_text(name)
    os.symlink("../empty", root / "dir" / "rel")
    os.symlink("/nix/store/abc-x/file", root / "abs")
    os.symlink("/does/not/exist", root / "dangling")


@needs_nix
def test_tree_matches_nix(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    make_tree(root)
    assert nar_bytes(root) == nix_dump(root)


@needs_nix
@pytest.mark.parametrize("kind", ["empty-file", "file", "exe", "symlink", "empty-dir"])
def test_single_nodes(tmp_path: Path, kind: str) -> None:
    node = tmp_path / "n"
    if kind == "empty-file":
        node.write_bytes(b"")
    elif kind == "file":
        node.write_bytes(b"x" * 70_000)  # larger than the inline limit: a file region
    elif kind == "exe":
        node.write_bytes(b"abc")
        node.chmod(0o755)
    elif kind == "symlink":
        os.symlink("target-of-odd-length", node)
    else:
        node.mkdir()
    assert nar_bytes(node) == nix_dump(node)


names = st.text(alphabet=st.sampled_from("aAbZ_-.~ 0é名"), min_size=1, max_size=6).filter(
    lambda n: n not in (".", "..")
)
files = st.tuples(st.binary(max_size=200), st.booleans())
trees = st.recursive(
    files | st.builds(lambda t: ("link", t), st.text(alphabet="ab/.", min_size=1, max_size=8)),
    lambda children: st.dictionaries(names, children, max_size=5),
    max_leaves=12,
)


def write(path: Path, tree: object) -> None:
    if isinstance(tree, dict):
        path.mkdir()
        for name, child in tree.items():
            write(path / name, child)
    elif isinstance(tree, tuple) and tree[0] == "link":
        os.symlink(tree[1], path)
    else:
        assert isinstance(tree, tuple)
        data, exe = tree
        path.write_bytes(data)
        path.chmod(0o755 if exe else 0o644)


@needs_nix
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=trees)
def test_random_trees_match_nix(tree: object) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        write(root, tree)
        assert nar_bytes(root) == nix_dump(root)


def test_listing_offsets_point_at_contents(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    make_tree(root)
    nar = nar_bytes(root)
    doc = listing(root)
    assert doc["version"] == 1
    checked = 0

    def visit(node: dict[str, object], path: Path) -> None:
        nonlocal checked
        if node["type"] == "regular":
            off, size = int(node["narOffset"]), int(node["size"])  # type: ignore[call-overload]
            assert nar[off : off + size] == path.read_bytes()
            assert node.get("executable", False) == os.access(path, os.X_OK)
            checked += 1
        elif node["type"] == "directory":
            for name, child in node["entries"].items():  # type: ignore[union-attr]
                visit(child, path / name)
        else:
            assert node["target"] == os.readlink(path)

    visit(doc["root"], root)  # type: ignore[arg-type]
    assert checked >= 15
    json.dumps(doc)


def test_big_file_is_a_region_and_slices_match(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(os.urandom(200_000))
    segments = list(nar_segments(f))
    assert any(isinstance(s, FileRegion) for s in segments)
    whole = nar_bytes(f)
    for start, length in [(0, 10), (90, 1000), (100_000, 100_000), (len(whole) - 5, 5)]:
        out = bytearray()
        for seg in slice_segments(iter(segments), start, length):
            if isinstance(seg, bytes):
                out += seg
            else:
                with open(seg.path, "rb") as fh:
                    fh.seek(seg.offset)
                    out += fh.read(seg.size)
        assert bytes(out) == whole[start : start + length]
