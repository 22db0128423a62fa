"""The shaped-link phase's helpers that need no namespaces."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.shaped import prefault


def test_prefault_writes_the_size_asked_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes) -> int:
        n = real_write(fd, data)
        written.append(n)
        return n

    monkeypatch.setattr(os, "write", counting_write)
    prefault(tmp_path, 3 << 20)
    assert sum(written) == 3 << 20
    assert list(tmp_path.iterdir()) == []
