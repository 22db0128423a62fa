"""Golden files for the renderers: compare, or rewrite them with HARMONIA_UPDATE_GOLDEN=1."""

from __future__ import annotations

import os
from pathlib import Path

GOLDEN_DIR = Path(__file__).parent / "golden"
UPDATE_ENV = "HARMONIA_UPDATE_GOLDEN"


def check_golden(name: str, actual: str) -> None:
    """Assert ``actual`` equals golden/<name>; with HARMONIA_UPDATE_GOLDEN=1, write it instead."""
    path = GOLDEN_DIR / name
    if os.environ.get(UPDATE_ENV) == "1":
        path.write_text(actual)
        return
    assert path.exists(), f"missing golden file {path}; run with {UPDATE_ENV}=1 to create it"
    expected = path.read_text()
    assert actual == expected, (
        f"rendered output differs from {path}; if the change is intended, "
        f"rerun with {UPDATE_ENV}=1 and review the diff"
    )
