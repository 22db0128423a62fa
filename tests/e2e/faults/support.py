"""Helpers of the fault suite: the real server's workers and their resources, bounded load.

- `worker_pids`, `rss_bytes`, `open_fds` read a worker's resources from /proc;
- `Load` runs bounded HTTP/1.1 load in threads and counts what clients saw (statuses, retries);
- `Figures` records a scenario's numbers (see conftest.py for where they go).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.cache_server import CacheServer
from tests.support.fixtures import Fixtures
from tests.support.nix import nix_env, run

SCENARIO_SECONDS = 30  # every scenario ends within this (the CI budget per scenario)
FIGURES: dict[str, dict[str, Any]] = {}  # scenario name -> its figures


def children(pid: int) -> list[int]:
    """The direct children of a process (the workers of a supervisor)."""
    found: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError):
                found += [int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return sorted(found)


def worker_pids(cache: CacheServer, expected: int, timeout: float = 15) -> list[int]:
    """The server's worker processes, once `expected` of them are serving."""
    deadline = time.monotonic() + timeout
    while True:
        pids = children(cache.proc.pid)
        if len(pids) == expected or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def hostport(cache: CacheServer) -> tuple[str, int]:
    host, port = cache.hostport.rsplit(":", 1)
    return host, int(port)


def narinfo_targets(fixtures: Fixtures) -> list[str]:
    return [f"/{Path(p).name[:32]}.narinfo" for p in fixtures.small] + ["/nix-cache-info"]


RETRYABLE = (ConnectionError, http.client.HTTPException, TimeoutError, OSError)


@dataclass
class LoadResult:
    statuses: Counter[int] = field(default_factory=Counter)
    retried: int = 0  # requests retried on a new connection after a reset (as Nix retries)
    failed: int = 0  # requests that still failed after the retries
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.total,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "5xx": self.server_errors,
            "retried_after_reset": self.retried,
            "failed_after_retries": self.failed,
            "errors": dict(self.errors),
        }


class Load:
    """Bounded HTTP/1.1 load from `clients` threads, each on its own keep-alive connection,
    cycling through `targets` until stopped (or `max_seconds`). A request that meets a reset or
    a closed connection is retried on a new connection up to `retries` times, as Nix does."""

    def __init__(
        self,
        cache: CacheServer,
        targets: list[str],
        *,
        clients: int = 4,
        retries: int = 3,
        max_seconds: float = 20,
        fresh_connections: bool = False,
        timeout: float = 10,
    ) -> None:
        self.host, self.port = hostport(cache)
        self.targets = targets
        self.clients = clients
        self.retries = retries
        self.max_seconds = max_seconds
        self.fresh = fresh_connections
        self.timeout = timeout
        self.result = LoadResult()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.counting = True  # set False to stop counting (e.g. once the server was told to stop)

    def __enter__(self) -> Load:
        deadline = time.monotonic() + self.max_seconds
        for n in range(self.clients):
            t = threading.Thread(target=self._run, args=(n, deadline), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> LoadResult:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)
        return self.result

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _run(self, n: int, deadline: float) -> None:
        conn = self._connect()
        i = n
        while not self._stop.is_set() and time.monotonic() < deadline:
            target = self.targets[i % len(self.targets)]
            i += 1
            for attempt in range(self.retries + 1):
                try:
                    headers = {"Connection": "close"} if self.fresh else {}
                    conn.request("GET", target, headers=headers)
                    resp = conn.getresponse()
                    resp.read()
                    if self.fresh or resp.will_close:
                        conn.close()
                        conn = self._connect()
                    with self._lock:
                        if self.counting:
                            self.result.statuses[resp.status] += 1
                            self.result.retried += attempt > 0
                    break
                except RETRYABLE as exc:
                    conn.close()
                    conn = self._connect()
                    if attempt == self.retries:
                        with self._lock:
                            if self.counting:
                                self.result.failed += 1
                                self.result.errors[type(exc).__name__] += 1
                    elif self._stop.is_set():
                        break
                    else:
                        time.sleep(0.05 * (attempt + 1))
        conn.close()


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def answers(cache: CacheServer, path: str = "/nix-cache-info", timeout: float = 5) -> int | None:
    """The status of one request on a new connection, None when it failed."""
    host, port = hostport(cache)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def log_lines(cache: CacheServer, needle: str) -> list[str]:
    return [line for line in list(cache.lines) if needle in line]


def reset_connect(host: str, port: int) -> None:
    """Connect and reset at once (SO_LINGER 0): the cheapest abuse a client can send."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    try:
        s.connect((host, port))
    finally:
        s.close()


class Figures:
    """One scenario's figures: `figures.record(key=value, …)`; printed and kept for the JSON."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.values: dict[str, Any] = {}

    def record(self, **values: Any) -> None:
        self.values.update(values)
        FIGURES[self.name] = self.values
        print(f"\n[faults] {self.name}: {json.dumps(values, sort_keys=True)}")


class OwnDaemon:
    """A nix-daemon of the test's own: its own socket and its own store (a chroot store under
    `state`, filled from the host store), so the test may kill and restart it freely. Only the
    processes this class started are ever signalled."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.root = state / "root"
        self.socket = state / "daemon.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        state.mkdir(parents=True, exist_ok=True)
        self.env = nix_env(state / "xdg")

    @property
    def store_dir(self) -> Path:
        """Where the own store's files really are (the cache's real_nix_store)."""
        return self.root / "nix" / "store"

    def populate(self, paths: list[str], host_env: dict[str, str]) -> None:
        run(["nix", "copy", "--no-check-sigs", "--to", f"local?root={self.root}", *paths], env=host_env)

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # a stale socket file refuses connections
        env = dict(self.env, NIX_DAEMON_SOCKET_PATH=str(self.socket))
        log = (self.state / "nix-daemon.log").open("ab")
        self.proc = subprocess.Popen(
            ["nix-daemon", "--option", "store", f"local?root={self.root}"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.starts += 1
        probe = ["nix", "store", "ping", "--store", f"unix://{self.socket}"]
        wait_for(
            lambda: run(probe, env=self.env, timeout=20, check=False).returncode == 0, 20, "own nix-daemon"
        )

    def connection_processes(self) -> list[int]:
        """The daemon's per-connection processes (it forks one for each client connection)."""
        return children(self.proc.pid) if self.proc is not None else []

    def kill_connections(self) -> int:
        """What a client sees of a daemon restart: every connection's process dies at once."""
        pids = self.connection_processes()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def restart(self) -> int:
        """A full restart, as systemd does it: the daemon and its connection processes go, a new
        daemon takes the socket."""
        killed = self.stop()
        self.start()
        return killed

    def stop(self) -> int:
        if self.proc is None:
            return 0
        pids = self.connection_processes()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc = None
        return len(pids)

    def __enter__(self) -> OwnDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
