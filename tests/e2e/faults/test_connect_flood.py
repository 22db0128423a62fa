"""A connect-and-reset flood must not starve normal clients.

Flooders connect to the cache and reset at once (SO_LINGER 0), as fast as they can, for a bounded
time and count, on loopback only. Meanwhile a normal client probes with a new connection and one
request every 0.25 s; each probe must answer within its timeout.
"""

from __future__ import annotations

import http.client
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.cache_server import start_cache

from .support import Figures, hostport

pytestmark = pytest.mark.e2e

FLOOD_SECONDS = 8.0
FLOOD_LIMIT = 400_000  # connections per flooder process, at most
FLOODERS = 2
IN_FLIGHT = 256  # connects in progress at once per flooder
PROBES = 24
PROBE_TIMEOUT = 1.0  # a 150-byte answer on loopback; a probe whose SYN the kernel dropped (its queue
# was full) waits 1 s for the retransmission, and fails

FLOOD = r"""
import errno, selectors, socket, struct, sys, time
host, port, seconds, limit, inflight = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
linger = struct.pack("ii", 1, 0)
sel = selectors.DefaultSelector()
connected = failed = started = 0
end = time.monotonic() + seconds
pending = {}
while time.monotonic() < end:
    while len(pending) < inflight and started < limit:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        if s.connect_ex((host, port)) not in (0, errno.EINPROGRESS):
            s.close(); failed += 1; continue
        started += 1
        pending[s] = time.monotonic()
        sel.register(s, selectors.EVENT_WRITE)
    if not pending:
        break
    for key, _ in sel.select(0.05):
        s = key.fileobj
        sel.unregister(s)
        del pending[s]
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            connected += 1
        else:
            failed += 1
        s.close()  # an abortive close: RST
    now = time.monotonic()
    for s, t in list(pending.items()):
        if now - t > 1.0:  # the server's queue is full: give up on this one
            sel.unregister(s); del pending[s]; s.close(); failed += 1
for s in list(pending):
    s.close()
print(connected, failed)
"""


def probe(host: str, port: int) -> float | None:
    """Seconds until a normal request on a new connection was answered, None when it failed."""
    started = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=PROBE_TIMEOUT)
    try:
        conn.request("GET", "/nix-cache-info")
        resp = conn.getresponse()
        resp.read()
        return time.monotonic() - started if resp.status == 200 else None
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def test_connect_flood_does_not_starve_normal_clients(
    tmp_path: Path, nix_daemon_env: dict[str, str], figures: Figures
) -> None:
    with start_cache(tmp_path, workers=2) as cache:
        host, port = hostport(cache)
        assert probe(host, port) is not None
        flooders = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    FLOOD,
                    host,
                    str(port),
                    str(FLOOD_SECONDS),
                    str(FLOOD_LIMIT),
                    str(IN_FLIGHT),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(FLOODERS)
        ]
        try:
            time.sleep(0.5)  # the flood is on
            latencies: list[float | None] = [None] * PROBES
            probers = []
            for n in range(PROBES):  # one every 0.25 s, each on its own connection

                def one(n: int = n) -> None:
                    latencies[n] = probe(host, port)

                probers.append(threading.Thread(target=one, daemon=True))
                probers[-1].start()
                time.sleep(0.25)
            for t in probers:
                t.join(PROBE_TIMEOUT + 2)
            outs = [f.communicate(timeout=FLOOD_SECONDS + 10)[0].split() for f in flooders]
        finally:
            for f in flooders:
                if f.poll() is None:
                    f.kill()
                    f.wait(5)
        connects = sum(int(o[0]) for o in outs)
        connect_failures = sum(int(o[1]) for o in outs)
        ok = [t for t in latencies if t is not None]
        figures.record(
            flood_seconds=FLOOD_SECONDS,
            flood_connections=connects,
            flood_rate_per_s=round(connects / FLOOD_SECONDS),
            flood_connects_failed=connect_failures,
            probes_ok=len(ok),
            probes_total=PROBES,
            probe_timeout_s=PROBE_TIMEOUT,
            probe_latency_max_s=round(max(ok), 3) if ok else None,
            probe_latency_median_s=round(sorted(ok)[len(ok) // 2], 3) if ok else None,
        )
        assert connects + connect_failures > 2_000, "the flood did not happen"
        assert len(ok) == len(latencies), f"{len(latencies) - len(ok)} of {len(latencies)} probes failed"
        assert probe(host, port) is not None  # and the server is fine afterwards
        assert "Traceback" not in cache.log
