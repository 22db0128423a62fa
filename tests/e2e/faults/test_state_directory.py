"""A full or read-only state directory (issue 14, row 5): the cache degrades to compressing on the
fly, warns once per condition, counts it in /metrics, and no worker dies; `.nar.zst` never 500s.

The state directory is a small tmpfs mounted by the test (root only; skipped otherwise).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import zstandard

from tests.support.cache_server import CacheServer, start_cache
from tests.support.fixtures import Fixtures
from tests.support.nix import dump

pytestmark = pytest.mark.e2e

WORKERS = 2
BOUND = 30.0  # seconds per scenario


def _mount_tmpfs(target: Path, options: str) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): needs root")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


@pytest.fixture
def full_state(tmp_path: Path) -> Iterator[Path]:
    """1 MiB: far too small for the 196 MB path's compressed copy (about 7 MiB)."""
    yield from _mount_tmpfs(tmp_path / "full", "size=1m,mode=0755")


@pytest.fixture
def read_only_state(tmp_path: Path) -> Iterator[Path]:
    yield from _mount_tmpfs(tmp_path / "ro", "size=1m,mode=0755,ro")


def _fields(text: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in text.splitlines())


def _metric(text: str, name: str) -> int:
    found = [line for line in text.splitlines() if line.startswith(name + " ")]
    return int(found[0].split()[-1]) if found else 0


def _worker_pids(cache: CacheServer) -> set[int]:
    pid = cache.proc.pid
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def _degrades_without_dying(
    cache: CacheServer, fixtures: Fixtures, nix_env: dict[str, str], needle: str
) -> None:
    deadline = time.monotonic() + BOUND
    with httpx.Client(base_url=cache.url, timeout=BOUND, headers={"Accept-Encoding": "identity"}) as client:
        workers = _worker_pids(cache)
        assert len(workers) == WORKERS
        paths = [fixtures.big, *fixtures.small]
        # many narinfo requests for paths without a copy: each one used to retry (and kill a worker)
        while True:
            for path in paths:
                resp = client.get(f"/{Path(path).name[:32]}.narinfo")
                assert resp.status_code == 200, resp.text
                url = _fields(resp.text)["URL"]
                if ".nar.zst" in url:
                    assert client.head("/" + url).status_code == 200
            assert _worker_pids(cache) == workers, f"a worker was restarted:\n{cache.log}"
            metrics = client.get("/metrics").text
            if _metric(metrics, "harmonia_state_directory_degraded") >= 1:
                break
            assert time.monotonic() < deadline, f"no degraded state reported:\n{metrics}\n{cache.log}"
            time.sleep(0.2)
        assert _metric(metrics, "harmonia_compressed_copy_failures_total") >= 1
        fields = _fields(client.get(f"/{Path(fixtures.big).name[:32]}.narinfo").text)
        assert fields["Compression"] == "zstd"  # the narinfo a client may have cached stays true
        # the compressed NAR is made on the fly: a whole 200, never a 500
        resp = client.get("/" + fields["URL"])
        assert resp.status_code == 200
        assert zstandard.ZstdDecompressor().decompressobj().decompress(resp.content) == dump(
            fixtures.big, nix_env
        )
        for _ in range(20):
            assert client.get(f"/{Path(fixtures.big).name[:32]}.narinfo").status_code == 200
        assert _worker_pids(cache) == workers, f"a worker was restarted:\n{cache.log}"
    log = cache.log
    assert "exited; restarting" not in log and "Traceback" not in log, log
    warnings = [line for line in log.splitlines() if "WARNING" in line and needle in line]
    # one warning per condition in each worker, not one per request
    assert 1 <= len(warnings) <= WORKERS, log


def test_full_state_directory_degrades_to_live_streams(
    full_state: Path, tmp_path: Path, store_fixtures: Fixtures, nix_daemon_env: dict[str, str]
) -> None:
    with start_cache(
        tmp_path / "srv", workers=WORKERS, state_directory=str(full_state), zstd={"level": 3}
    ) as cache:
        _degrades_without_dying(cache, store_fixtures, nix_daemon_env, "No space left on device")
    assert not list(full_state.rglob("*.tmp")), "a partial copy was left behind"


def test_read_only_state_directory_degrades_to_live_streams(
    read_only_state: Path, tmp_path: Path, store_fixtures: Fixtures, nix_daemon_env: dict[str, str]
) -> None:
    with start_cache(
        tmp_path / "srv", workers=WORKERS, state_directory=str(read_only_state), zstd={"level": 3}
    ) as cache:
        _degrades_without_dying(cache, store_fixtures, nix_daemon_env, "Read-only file system")
