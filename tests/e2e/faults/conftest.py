"""The fault suite: faults and abuse driven against the real server, each scenario bounded (≤ 30 s).

Helpers are in `support.py`; the server starts through tests/support/cache_server.py (cache/launch.py).
Each scenario records its figures with the `figures` fixture: printed (`-s` shows them) and written
to `<pytest basetemp>/faults-figures.json` at the end of the session (`FAULTS_FIGURES=/path.json`
writes them there instead), so docs/reliability.md can quote them.

Run alone: `python -m pytest tests/e2e/faults -s`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .support import FIGURES, Figures


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    return Figures(request.node.name)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not FIGURES:
        return
    target = os.environ.get("FAULTS_FIGURES")
    if target:
        path = Path(target)
    else:
        factory = getattr(session.config, "_tmp_path_factory", None)
        if factory is None:
            return
        path = factory.getbasetemp() / "faults-figures.json"
    path.write_text(json.dumps(FIGURES, indent=2, sort_keys=True) + "\n")
    print(f"\n[faults] figures written to {path}")
