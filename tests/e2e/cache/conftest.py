from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cache_server import CacheServer, start_cache


@pytest.fixture(scope="module", params=["db", "daemon", "daemon-nar"])
def cache(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, nix_daemon_env: dict[str, str]
) -> Iterator[CacheServer]:
    """The real server over each store backend, priority 60 as the fleet runs it.

    "daemon" reads metadata from the daemon and files from the store; "daemon-nar" also takes every
    NAR from the daemon (NarFromPath), as for a store this process cannot read.
    """
    tmp: Path = tmp_path_factory.mktemp(f"cache-{request.param}")
    backend = "daemon" if request.param.startswith("daemon") else "db"
    source = "daemon" if request.param == "daemon-nar" else "auto"
    with start_cache(
        tmp, store_backend=backend, nar_source=source, priority=60, enable_compression=False
    ) as server:
        yield server
