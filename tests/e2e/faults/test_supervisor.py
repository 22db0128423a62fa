"""The supervisor: restart backoff that resets after a healthy run, signals answered during a
backoff, and SIGTERM under load ending within the grace period."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cache.server import GRACE_SECONDS, HEALTHY_ENV
from tests.support.cache_server import CacheServer, start_cache
from tests.support.fixtures import Fixtures

from .support import Figures, Load, answers, children, hostport, narinfo_targets, wait_for

pytestmark = pytest.mark.e2e
RESTART = re.compile(r"restarting it in ([\d.]+)s")


def restart_delays(cache: CacheServer) -> list[float]:
    return [float(m.group(1)) for line in list(cache.lines) if (m := RESTART.search(line))]


def kill_worker(cache: CacheServer, victim: int, *, wait_restart: bool = True) -> int:
    """SIGKILL one worker; return the pid that replaces it (once it runs), or 0 when not waiting."""
    others = set(children(cache.proc.pid)) - {victim}
    logged = len(restart_delays(cache))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(restart_delays(cache)) > logged, 10, "the restart to be scheduled")
    if not wait_restart:
        return 0
    replaced: list[int] = []

    def back() -> bool:
        new = set(children(cache.proc.pid)) - others - {victim}
        replaced[:] = sorted(new)
        return bool(new)

    wait_for(back, 40, "the worker to be restarted")
    wait_for(lambda: answers(cache) == 200, 10, "the server to answer")
    return replaced[0]


def test_backoff_resets_after_a_healthy_run(
    tmp_path: Path, nix_daemon_env: dict[str, str], figures: Figures
) -> None:
    healthy = 5.0
    env = {**os.environ, HEALTHY_ENV: str(healthy)}
    with start_cache(tmp_path, workers=2, env=env) as cache:
        victim = sorted(children(cache.proc.pid))[0]
        for _ in range(3):  # dies at once, three times: 0.5 s, 1 s, 2 s
            victim = kill_worker(cache, victim)
        time.sleep(healthy + 0.5)  # now it has run long enough to count as healthy
        kill_worker(cache, victim)
        delays = restart_delays(cache)
        figures.record(healthy_seconds=healthy, restart_delays=delays)
        assert delays[:3] == [0.5, 1.0, 2.0], cache.log
        assert delays[3] == 0.5, f"backoff did not reset after a healthy run: {delays}\n{cache.log}"


def test_signals_are_answered_during_a_backoff(
    tmp_path: Path, nix_daemon_env: dict[str, str], figures: Figures
) -> None:
    with start_cache(tmp_path, workers=2) as cache:
        victim = sorted(children(cache.proc.pid))[0]
        for _ in range(4):  # 0.5, 1, 2, 4 s
            victim = kill_worker(cache, victim)
        kill_worker(cache, victim, wait_restart=False)  # the next restart waits 8 s
        assert restart_delays(cache)[-1] == 8.0, cache.log
        assert answers(cache) == 200  # the other worker serves meanwhile

        hup_sent = time.monotonic()
        cache.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any("received SIGHUP" in line for line in cache.lines), 3, "SIGHUP to be handled")
        hup_seconds = time.monotonic() - hup_sent
        assert cache.proc.poll() is None and answers(cache) == 200  # SIGHUP stops nothing

        term_sent = time.monotonic()
        cache.proc.send_signal(signal.SIGTERM)
        try:
            code = cache.proc.wait(GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            code = None
        term_seconds = time.monotonic() - term_sent
        figures.record(
            pending_restart_delay=8.0,
            sighup_handled_after_s=round(hup_seconds, 2),
            sigterm_exit_after_s=round(term_seconds, 2),
        )
        assert code == 0, f"exit {code} after {term_seconds:.1f}s\n{cache.log}"
        # nothing is running but idle connections: the stop must not wait for the pending restart
        assert term_seconds < 4, f"SIGTERM during a backoff took {term_seconds:.1f}s"


def test_sigterm_under_load_ends_within_the_grace_period(
    tmp_path: Path, store_fixtures: Fixtures, figures: Figures
) -> None:
    """Load on keep-alive connections plus one slow reader of the big NAR that cannot finish within
    the grace period: the server stops accepting, finishes what it can, cuts the rest at the end of
    the grace period and exits 0. No request gets a 5xx."""
    with start_cache(tmp_path, workers=2) as cache:
        h = Path(store_fixtures.big).name[:32]
        slow_received: list[int] = []
        slow_started = threading.Event()

        def slow_reader() -> None:
            import http.client

            host, port = hostport(cache)
            conn = http.client.HTTPConnection(host, port, timeout=30)
            text = answers_text(conn, f"/{h}.narinfo")
            narhash = text.split("NarHash: sha256:")[1][:52]
            conn.request("GET", f"/nar/{narhash}.nar?hash={h}", headers={"Accept-Encoding": "identity"})
            resp = conn.getresponse()
            got = 0
            try:
                while chunk := resp.read(16384):
                    got += len(chunk)
                    slow_started.set()
                    time.sleep(0.01)  # ~1.6 MB/s: the 196 MB NAR would take two minutes
            except (OSError, http.client.HTTPException):
                pass
            slow_received.append(got)
            conn.close()

        reader = threading.Thread(target=slow_reader, daemon=True)
        reader.start()
        with Load(cache, narinfo_targets(store_fixtures), clients=4, max_seconds=25) as load:
            assert slow_started.wait(10)
            time.sleep(1.5)
            load.counting = False  # from here on, refused connections are the expected end
            before = load.result.summary()
            sent = time.monotonic()
            cache.proc.send_signal(signal.SIGTERM)
            try:
                code = cache.proc.wait(GRACE_SECONDS + 10)
            except subprocess.TimeoutExpired:
                code = None
            elapsed = time.monotonic() - sent
        reader.join(10)
        figures.record(
            grace_seconds=GRACE_SECONDS,
            exit_after_s=round(elapsed, 2),
            exit_code=code,
            slow_reader_bytes=slow_received[0] if slow_received else None,
            **before,
        )
        assert code == 0, cache.log
        assert elapsed <= GRACE_SECONDS + 3, f"took {elapsed:.1f}s"
        assert before["5xx"] == 0 and before["failed_after_retries"] == 0, before
        assert before["requests"] > 100, before


def answers_text(conn: object, path: str) -> str:
    import http.client

    assert isinstance(conn, http.client.HTTPConnection)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read().decode()
    assert resp.status == 200, body
    return body


def test_sighup_keeps_a_single_process_server_serving(tmp_path: Path, nix_daemon_env: dict[str, str]) -> None:
    with start_cache(tmp_path, workers=1) as cache:
        cache.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any("received SIGHUP" in line for line in cache.lines), 5, "SIGHUP to be handled")
        assert cache.proc.poll() is None and answers(cache) == 200


def test_a_second_sigterm_ends_running_transfers_at_once(
    tmp_path: Path, store_fixtures: Fixtures, figures: Figures
) -> None:
    """The supervisor passes a second SIGTERM on to the workers, which then cut what still runs."""
    import http.client

    with start_cache(tmp_path, workers=2) as cache:
        h = Path(store_fixtures.big).name[:32]
        host, port = hostport(cache)
        conn = http.client.HTTPConnection(host, port, timeout=30)
        narhash = answers_text(conn, f"/{h}.narinfo").split("NarHash: sha256:")[1][:52]
        conn.request("GET", f"/nar/{narhash}.nar?hash={h}", headers={"Accept-Encoding": "identity"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read(65536)  # a transfer that will not end by itself soon
        cache.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: any("received SIGTERM" in line for line in cache.lines), 5, "the first SIGTERM")
        time.sleep(0.5)
        sent = time.monotonic()
        cache.proc.send_signal(signal.SIGTERM)
        try:
            code = cache.proc.wait(GRACE_SECONDS + 10)
        except subprocess.TimeoutExpired:
            code = None
        elapsed = time.monotonic() - sent
        conn.close()
        figures.record(exit_after_second_sigterm_s=round(elapsed, 2), exit_code=code)
        assert code == 0, cache.log
        assert elapsed < GRACE_SECONDS / 2, f"the second SIGTERM took {elapsed:.1f}s"
