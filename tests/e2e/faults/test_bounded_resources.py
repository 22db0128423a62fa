"""What a connection costs a worker, measured: idle connections and connections holding an
unfinished 31 KiB request head (just under the 32 KiB limit). Memory grows by a bounded amount per
connection, and every file descriptor is given back once the clients go."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.support.cache_server import start_cache

from .support import Figures, answers, hostport, open_fds, rss_bytes, wait_for, worker_pids

pytestmark = pytest.mark.e2e

CONNECTIONS = 500
PARTIAL_HEAD = b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (31 * 1024)


def settled_fds(pid: int) -> int:
    """The worker's open descriptors once the count stops changing."""
    last = open_fds(pid)
    for _ in range(50):
        time.sleep(0.2)
        now = open_fds(pid)
        if now == last:
            return now
        last = now
    return last


def test_per_connection_memory_is_bounded_and_fds_come_back(
    tmp_path: Path, nix_daemon_env: dict[str, str], figures: Figures
) -> None:
    with start_cache(tmp_path, workers=1) as cache:
        host, port = hostport(cache)
        pid = cache.proc.pid  # workers = 1: the process is the worker
        assert worker_pids(cache, 0, timeout=0) == []
        for _ in range(20):  # warm up: first requests allocate what every later one reuses
            assert answers(cache) == 200
        fds_start = settled_fds(pid)  # the warm-up connections are closed on the server's side too
        rss_start = rss_bytes(pid)
        idle: list[socket.socket] = []
        heads: list[socket.socket] = []
        try:
            idle += [socket.create_connection((host, port), timeout=10) for _ in range(CONNECTIONS)]
            wait_for(lambda: open_fds(pid) >= fds_start + CONNECTIONS, 15, "the idle connections")
            rss_idle = rss_bytes(pid)

            heads += [socket.create_connection((host, port), timeout=10) for _ in range(CONNECTIONS)]
            for s in heads:
                s.sendall(PARTIAL_HEAD)
            wait_for(lambda: open_fds(pid) >= fds_start + 2 * CONNECTIONS, 15, "the partial-head connections")
            time.sleep(1)  # let the worker read what was sent
            rss_heads = rss_bytes(pid)
            assert answers(cache) == 200  # still serving
        finally:
            for s in idle + heads:
                s.close()
        wait_for(lambda: open_fds(pid) <= fds_start, 15, "the file descriptors to be closed")
        fds_end = open_fds(pid)
        per_idle = (rss_idle - rss_start) / CONNECTIONS
        per_head = (rss_heads - rss_idle) / CONNECTIONS
        figures.record(
            connections=CONNECTIONS,
            rss_mib_start=round(rss_start / 2**20, 1),
            rss_mib_with_idle=round(rss_idle / 2**20, 1),
            rss_mib_with_partial_heads=round(rss_heads / 2**20, 1),
            kib_per_idle_connection=round(per_idle / 1024, 1),
            kib_per_partial_head_connection=round(per_head / 1024, 1),
            fds_start=fds_start,
            fds_end=fds_end,
        )
        # an idle connection costs a task and a socket; a 31 KiB head its buffer on top of that
        assert per_idle < 64 * 1024, per_idle
        assert per_head < 128 * 1024, per_head
        assert fds_end <= fds_start
