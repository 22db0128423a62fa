"""Workers killed under load: the other workers share the listening socket and keep serving.

A killed worker's own connections are reset (clients retry them, as Nix does); nobody gets a 5xx
and no request fails after its retries. The supervisor restarts the worker.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.support.cache_server import start_cache
from tests.support.fixtures import Fixtures

from .support import Figures, Load, narinfo_targets, open_fds, rss_bytes, worker_pids

pytestmark = pytest.mark.e2e


def test_worker_kills_under_load_cost_no_5xx(
    tmp_path: Path, store_fixtures: Fixtures, figures: Figures
) -> None:
    kills = 3
    with start_cache(tmp_path, workers=2) as cache:
        pids = worker_pids(cache, 2)
        assert len(pids) == 2, pids
        rss_before = {pid: rss_bytes(pid) for pid in pids}
        with Load(cache, narinfo_targets(store_fixtures), clients=6, max_seconds=25) as load:
            time.sleep(1.5)
            for n in range(kills):
                victim = worker_pids(cache, 2)[n % 2]
                os.kill(victim, signal.SIGKILL)
                time.sleep(2.5)  # the supervisor restarts it after 0.5 s, 1 s, 2 s
            time.sleep(1)
            result = load.stop()
        after = worker_pids(cache, 2)
        assert len(after) == 2, f"workers not restarted: {after}\n{cache.log}"
        restarts = [line for line in cache.lines if "restarting it in" in line]
        figures.record(
            workers=2,
            kills=kills,
            restarts_logged=len(restarts),
            rss_mib_before={str(p): round(v / 2**20, 1) for p, v in rss_before.items()},
            rss_mib_after=[round(rss_bytes(p) / 2**20, 1) for p in after],
            fds_after=[open_fds(p) for p in after],
            **result.summary(),
        )
        assert result.total > 100, result.summary()
        assert result.server_errors == 0, result.summary()
        assert result.failed == 0, result.summary()
        assert len(restarts) == kills, cache.log
        assert "Traceback" not in cache.log
