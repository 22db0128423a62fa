"""The daemon backend while the nix-daemon restarts under load: no 5xx.

A daemon restart kills every connection's process at once, so every pooled connection of every
worker is dead at the same moment. The backend drops them all at the first sign and retries its
(read-only) queries on new connections; a NAR that fails before its first byte is asked again.
The daemon is the test's own (own socket, own store), never the system's.
"""

from __future__ import annotations

import http.client
import time
from pathlib import Path

import pytest

from tests.support.cache_server import start_cache
from tests.support.fixtures import Fixtures

from .support import Figures, Load, OwnDaemon, hostport, narinfo_targets

pytestmark = pytest.mark.e2e


def nar_urls(host: str, port: int, narinfos: list[str]) -> list[str]:
    urls = []
    conn = http.client.HTTPConnection(host, port, timeout=20)
    for target in narinfos:
        conn.request("GET", target)
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200, (target, body)
        urls += ["/" + line.split(": ", 1)[1] for line in body.splitlines() if line.startswith("URL: ")]
    conn.close()
    return urls


def test_daemon_restart_under_load_costs_no_5xx(
    tmp_path: Path, store_fixtures: Fixtures, nix_daemon_env: dict[str, str], figures: Figures
) -> None:
    daemon = OwnDaemon(tmp_path / "daemon")
    daemon.populate(store_fixtures.small, nix_daemon_env)
    with (
        daemon,
        start_cache(
            tmp_path / "srv",
            workers=2,
            store_backend="daemon",
            daemon_socket=str(daemon.socket),
            real_nix_store=str(daemon.store_dir),
            nar_source="daemon",  # NARs stream from the daemon too: both kinds of use are hit
            enable_compression=False,
        ) as cache,
    ):
        narinfos = [t for t in narinfo_targets(store_fixtures) if t.endswith(".narinfo")]
        targets = narinfos + nar_urls(*hostport(cache), narinfos)
        events: list[dict[str, object]] = []
        with Load(cache, targets, clients=6, max_seconds=25) as load:
            time.sleep(1.5)
            for n in range(4):
                if n % 2 == 0:
                    events.append({"kind": "connections killed", "processes": daemon.kill_connections()})
                else:
                    events.append({"kind": "daemon restarted", "processes": daemon.restart()})
                time.sleep(1.5)
            result = load.stop()
        figures.record(events=events, daemon_starts=daemon.starts, **result.summary())
        assert all(int(str(e["processes"])) > 0 for e in events), events  # each event hit live connections
        assert result.total > 100, result.summary()
        assert result.server_errors == 0, f"{result.summary()}\n{cache.log}"
        assert result.failed == 0, result.summary()
