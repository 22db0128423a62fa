from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cache_server import CacheServer, start_cache


@pytest.fixture(scope="module", params=["db", "daemon"])
def cache(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, nix_daemon_env: dict[str, str]
) -> Iterator[CacheServer]:
    """The real server over each store backend, priority 60 as the fleet runs it."""
    tmp: Path = tmp_path_factory.mktemp(f"cache-{request.param}")
    with start_cache(tmp, store_backend=request.param, priority=60, enable_compression=False) as server:
        yield server
