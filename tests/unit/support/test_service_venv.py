"""What the deployment-style install is keyed by: the files `pip install .` builds from."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.support import service_venv
from tests.support.service_venv import packages, source_digest

PYPROJECT = """[project]
name = "{name}"
[tool.setuptools.packages.find]
include = ["common*", "cache*", "deploy*"]
"""
PACKAGES = ("common", "cache", "deploy")


def _tree(root: Path) -> Path:
    root.mkdir()
    (root / "pyproject.toml").write_text(PYPROJECT.format(name="x"))
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
    (root / "pyproject.toml").write_text(PYPROJECT.format(name="y"))
    assert source_digest(root) != changed


def test_digest_sees_renames(tmp_path: Path) -> None:
    root = _tree(tmp_path / "repo")
    (root / "cache" / "a.py").write_text("x = 1\n")
    before = source_digest(root)
    (root / "cache" / "a.py").rename(root / "cache" / "b.py")
    assert source_digest(root) != before


def test_packages_are_the_ones_pyproject_includes(tmp_path: Path) -> None:
    root = _tree(tmp_path / "repo")
    (root / "tests").mkdir()
    (root / "tests" / "__init__.py").write_text("")
    (root / "docs").mkdir()
    assert packages(root) == ["cache", "common", "deploy"]
    (root / "common" / "x.py").write_text("")
    before = source_digest(root)
    (root / "common" / "x.py").write_text("changed = True\n")
    assert source_digest(root) != before  # a package added to pyproject is part of the digest


def test_this_checkout_ships_what_pyproject_says() -> None:
    repo = Path(__file__).resolve().parents[3]
    assert {"cache", "deploy"} <= set(packages(repo))


def test_prune_keeps_the_recent_and_the_busy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_venv, "SERVICE_VENVS", tmp_path)
    now = time.time()
    ages = {"in-use": 0, "a": 60, "b": 120, "c": 180, "busy": 600, "idle": 2 * 3600, "stale": 2 * 86400}
    for name, age in ages.items():
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (now - age, now - age))
    service_venv._prune(keep=tmp_path / "in-use")
    # the newest three besides the one in use stay; beyond them only what ran within the hour
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "busy", "c", "in-use"]
