"""The bench's fresh builds, with the real Nix: a run removes from the store what it built anew."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from bench import fixtures

pytestmark = pytest.mark.e2e


def test_remove_fresh_deletes_closures_and_derivations_it_built_and_nothing_else(
    nix_daemon_env: dict[str, str], tmp_path: Path
) -> None:
    # a path built by the same expression but not by this run's fresh builds stays
    other = fixtures.build_fresh_closure(tmp_path, f"kept-{time.time_ns()}", 2)
    fixtures.FRESH_BUILT.clear()
    top = fixtures.build_fresh_closure(tmp_path, f"gone-{time.time_ns()}", 3)
    closure = fixtures.requisites([top], tmp_path)
    assert len(closure) == 4  # three small paths in a chain and the top
    assert [top] == fixtures.FRESH_BUILT
    drvs = [d for d in os.listdir("/nix/store") if d.endswith(".drv") and top.split("-", 1)[1] in d]
    assert drvs

    assert fixtures.remove_fresh(tmp_path) == []

    assert fixtures.FRESH_BUILT == []
    assert not any(os.path.exists(path) for path in closure)
    assert not any(os.path.exists(f"/nix/store/{d}") for d in drvs)
    assert os.path.exists(other)
    fixtures.FRESH_BUILT.append(other)
    assert fixtures.remove_fresh(tmp_path) == []
    assert not os.path.exists(other)
