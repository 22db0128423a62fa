"""The fault suite: faults and abuse against the real server, each scenario bounded (≤ 30 s).

Run it alone with `pytest tests/e2e/faults`; every scenario records its figures, printed at the
end of the run (and kept as junit properties).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

_FIGURES: list[str] = []


@pytest.fixture
def figures(request: pytest.FixtureRequest, record_property: object) -> Iterator[dict[str, object]]:
    found: dict[str, object] = {}
    yield found
    if found:
        _FIGURES.append(f"{request.node.nodeid}: " + ", ".join(f"{k}={v}" for k, v in found.items()))
        for key, value in found.items():
            record_property(key, value)  # type: ignore[operator]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FIGURES:
        terminalreporter.section("fault suite figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
