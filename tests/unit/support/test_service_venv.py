"""What the deployment-style install is keyed by: the files `pip install .` builds from."""

from __future__ import annotations

from pathlib import Path

from tests.support.service_venv import PACKAGES, source_digest


def _tree(root: Path) -> Path:
    root.mkdir()
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    for package in PACKAGES:
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text(f"# {package}\n")
    return root


def test_digest_follows_the_package_sources(tmp_path: Path) -> None:
    root = _tree(tmp_path / "repo")
    first = source_digest(root)
    assert source_digest(root) == first
    (root / "cache" / "__pycache__").mkdir()
    (root / "cache" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text("")
    assert source_digest(root) == first  # byte code and tests are not part of the install
    (root / "deploy" / "systemd").mkdir()
    (root / "deploy" / "systemd" / "unit.service").write_text("[Unit]\n")
    changed = source_digest(root)
    assert changed != first  # package data is
    (root / "pyproject.toml").write_text("[project]\nname = 'y'\n")
    assert source_digest(root) != changed


def test_digest_sees_renames(tmp_path: Path) -> None:
    root = _tree(tmp_path / "repo")
    (root / "cache" / "a.py").write_text("x = 1\n")
    before = source_digest(root)
    (root / "cache" / "a.py").rename(root / "cache" / "b.py")
    assert source_digest(root) != before
