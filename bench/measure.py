"""Load generation (wrk), single transfers (curl), and memory sampling of a process tree."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

WRK_SCRIPT = r"""
local paths = {}
local counter = 0
function init(args)
  for line in io.lines(args[1]) do table.insert(paths, line) end
  counter = math.random(#paths)
end
function request()
  counter = counter % #paths + 1
  return wrk.format("GET", paths[counter])
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'JSON{"requests":%d,"duration_us":%d,"bytes":%d,"status":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"timeout":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    bytes: int
    errors: int
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def mib_per_s(self) -> float:
        return self.bytes / self.seconds / 2**20


def wrk(
    base_url: str,
    paths: list[str],
    work: Path,
    *,
    connections: int,
    seconds: float,
    headers: dict[str, str] | None = None,
    threads: int = 1,
) -> LoadResult:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (./bootstrap bench installs it)")
    script = work / "paths.lua"
    script.write_text(WRK_SCRIPT)
    listing = work / f"paths-{abs(hash(tuple(paths)))}.txt"
    listing.write_text("\n".join(paths) + "\n")
    args = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "30s",
        "-s",
        str(script),
    ]
    for name, value in (headers or {}).items():
        args += ["-H", f"{name}: {value}"]
    args += [base_url, "--", str(listing)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 120, check=True).stdout
    match = re.search(r"JSON(\{.*\})", out)
    if match is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    doc = json.loads(match.group(1))
    errors = sum(doc[k] for k in ("status", "connect", "read", "write", "timeout"))
    return LoadResult(
        doc["requests"],
        doc["duration_us"] / 1e6,
        doc["bytes"],
        errors,
        doc["p50_us"] / 1000,
        doc["p99_us"] / 1000,
    )


@dataclass(frozen=True)
class Transfer:
    seconds: float
    ttfb: float
    size: int
    status: int


def curl(url: str, headers: dict[str, str] | None = None) -> Transfer:
    args = [
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{time_total} %{time_starttransfer} %{size_download}",
    ]
    for name, value in (headers or {}).items():
        args += ["-H", f"{name}: {value}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, timeout=300, check=True).stdout
    status, total, ttfb, size = out.split()
    return Transfer(float(total), float(ttfb), int(size), int(status))


def best_of(n: int, url: str, headers: dict[str, str] | None = None) -> Transfer:
    """The fastest of n transfers: on a shared machine the noise only ever adds time."""
    return min((curl(url, headers) for _ in range(n)), key=lambda t: t.seconds)


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


class PeakRss:
    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
