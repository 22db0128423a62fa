"""Prometheus metrics shared by all worker processes.

Counters live in one anonymous shared memory map created before the workers fork; each worker
writes only its own slot (so no locks and no lost updates) and `/metrics` sums the slots.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable

ROUTES = (
    "landing", "nix-cache-info", "narinfo", "nar", "ls", "log", "serve", "version", "health",
    "metrics", "push", "other",
)  # fmt: skip
STATUSES = (
    200,
    206,
    304,
    400,
    401,
    403,
    404,
    405,
    409,
    413,
    416,
    424,
    429,
    431,
    500,
    502,
    503,
    0,
)  # 0: any other
# what became of a pushed path (its narinfo PUT), or of a refused upload
PUSH_OUTCOMES = (
    "imported", "already_valid", "unauthorized", "bad_signature", "bad_request", "conflict",
    "too_large", "daemon_failed",
)  # fmt: skip
# who asked the store for a path's metadata: a request (its client waited for the answer), the
# look-ahead (a reference of a path just asked for), the watch for new paths (as Nix registered it)
LOOKUPS = ("request", "look_ahead", "registration")
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 120.0)

_R, _S, _B = len(ROUTES), len(STATUSES), len(BUCKETS) + 1
_REQ = 0
_HIST = _REQ + _R * _S
_SUM_US = _HIST + _R * _B
_BYTES = _SUM_US + _R
_INFLIGHT = _BYTES + _R
_CONNS = _INFLIGHT + 1
_PUSHES = _CONNS + 1
_RECEIVED = _PUSHES + len(PUSH_OUTCOMES)
_COPIES = _RECEIVED + 1
_COPY_FAILURES = _COPIES + 1
_DEGRADED = _COPY_FAILURES + 1
_LOOKUPS = _DEGRADED + 1
SLOT_WORDS = _LOOKUPS + len(LOOKUPS)

_ROUTE_INDEX = {r: i for i, r in enumerate(ROUTES)}
_STATUS_INDEX = {s: i for i, s in enumerate(STATUSES)}


class Metrics:
    def __init__(self, workers: int = 1) -> None:
        self.workers = workers
        self._map = mmap.mmap(-1, max(1, workers) * SLOT_WORDS * 8)
        self._all = memoryview(self._map).cast("Q")
        self.slot = 0
        # this process's requests between their head and their last byte (not shared): work that
        # can wait (the look-ahead) waits for none to be open, so it never delays an answer
        self.exchanges_open = 0
        self.on_quiet: Callable[[], None] | None = None

    def exchange_opened(self) -> None:
        self.exchanges_open += 1

    def exchange_closed(self) -> None:
        self.exchanges_open -= 1
        if self.on_quiet is not None:
            self.on_quiet()

    def use_slot(self, slot: int) -> None:
        """Called in each worker after fork: which slot this process writes. A restarted worker
        holds no connections and no transfers: a dead one's gauges must not linger."""
        self.slot = slot
        self._all[self._base() + _CONNS] = 0
        self._all[self._base() + _INFLIGHT] = 0

    def _base(self) -> int:
        return self.slot * SLOT_WORDS

    def observe(self, route: str, status: int, seconds: float, sent: int) -> None:
        base = self._base()
        r = _ROUTE_INDEX.get(route, _R - 1)
        s = _STATUS_INDEX.get(status, _S - 1)
        words = self._all
        words[base + _REQ + r * _S + s] += 1
        b = 0
        while b < len(BUCKETS) and seconds > BUCKETS[b]:
            b += 1
        words[base + _HIST + r * _B + b] += 1
        words[base + _SUM_US + r] += int(seconds * 1e6)
        words[base + _BYTES + r] += sent

    def add_bytes(self, route: str, sent: int) -> None:
        self._all[self._base() + _BYTES + _ROUTE_INDEX.get(route, _R - 1)] += sent

    def nar_started(self) -> None:
        self._all[self._base() + _INFLIGHT] += 1

    def nar_finished(self) -> None:
        self._all[self._base() + _INFLIGHT] -= 1

    def connection_opened(self) -> None:
        self._all[self._base() + _CONNS] += 1

    def push_outcome(self, outcome: str) -> None:
        self._all[self._base() + _PUSHES + PUSH_OUTCOMES.index(outcome)] += 1

    def bytes_received(self, n: int) -> None:
        self._all[self._base() + _RECEIVED] += n

    def fewer_connections_elsewhere(self, slack: int) -> bool:
        """True when another worker holds more than `slack` fewer open connections than this one."""
        words = self._all
        mine = words[self._base() + _CONNS]
        return any(
            words[w * SLOT_WORDS + _CONNS] + slack < mine for w in range(self.workers) if w != self.slot
        )

    def connection_closed(self) -> None:
        self._all[self._base() + _CONNS] -= 1

    def store_lookup(self, by: str) -> None:
        self._all[self._base() + _LOOKUPS + LOOKUPS.index(by)] += 1

    def copy_made(self) -> None:
        self._all[self._base() + _COPIES] += 1

    def copy_failed(self) -> None:
        self._all[self._base() + _COPY_FAILURES] += 1

    def set_degraded(self, degraded: bool) -> None:
        self._all[self._base() + _DEGRADED] = int(degraded)

    def _sum(self, offset: int) -> int:
        return sum(self._all[w * SLOT_WORDS + offset] for w in range(self.workers))

    def render(self) -> str:
        out = [
            "# HELP harmonia_requests_total HTTP requests answered, by route and status.",
            "# TYPE harmonia_requests_total counter",
        ]
        for r, route in enumerate(ROUTES):
            for s, status in enumerate(STATUSES):
                n = self._sum(_REQ + r * _S + s)
                if n:
                    label = str(status) if status else "other"
                    out.append(f'harmonia_requests_total{{route="{route}",status="{label}"}} {n}')
        out += [
            "# HELP harmonia_request_duration_seconds Time from request to the last byte sent.",
            "# TYPE harmonia_request_duration_seconds histogram",
        ]
        for r, route in enumerate(ROUTES):
            counts = [self._sum(_HIST + r * _B + b) for b in range(_B)]
            total = sum(counts)
            if not total:
                continue
            running = 0
            for b, bound in enumerate(BUCKETS):
                running += counts[b]
                out.append(
                    f'harmonia_request_duration_seconds_bucket{{route="{route}",le="{bound}"}} {running}'
                )
            out.append(f'harmonia_request_duration_seconds_bucket{{route="{route}",le="+Inf"}} {total}')
            out.append(
                f'harmonia_request_duration_seconds_sum{{route="{route}"}} {self._sum(_SUM_US + r) / 1e6}'
            )
            out.append(f'harmonia_request_duration_seconds_count{{route="{route}"}} {total}')
        out += [
            "# HELP harmonia_bytes_sent_total Response body bytes sent, by route.",
            "# TYPE harmonia_bytes_sent_total counter",
        ]
        for r, route in enumerate(ROUTES):
            if n := self._sum(_BYTES + r):
                out.append(f'harmonia_bytes_sent_total{{route="{route}"}} {n}')
        out += [
            "# HELP harmonia_nars_in_flight NAR responses being sent right now.",
            "# TYPE harmonia_nars_in_flight gauge",
            f"harmonia_nars_in_flight {self._sum(_INFLIGHT)}",
            "# HELP harmonia_open_connections Client connections open right now.",
            "# TYPE harmonia_open_connections gauge",
            f"harmonia_open_connections {self._sum(_CONNS)}",
            "# HELP harmonia_push_total Pushed paths and refused uploads, by outcome.",
            "# TYPE harmonia_push_total counter",
            *(
                f'harmonia_push_total{{outcome="{outcome}"}} {self._sum(_PUSHES + i)}'
                for i, outcome in enumerate(PUSH_OUTCOMES)
            ),
            "# HELP harmonia_push_bytes_received_total Request body bytes received by push uploads.",
            "# TYPE harmonia_push_bytes_received_total counter",
            f"harmonia_push_bytes_received_total {self._sum(_RECEIVED)}",
            "# HELP harmonia_store_lookups_total Path metadata asked of the store, by who asked: "
            "a request (its client waited), the look-ahead, or the watch for new paths.",
            "# TYPE harmonia_store_lookups_total counter",
            *(
                f'harmonia_store_lookups_total{{by="{by}"}} {self._sum(_LOOKUPS + i)}'
                for i, by in enumerate(LOOKUPS)
            ),
            "# HELP harmonia_compressed_copies_total Compressed NAR copies made.",
            "# TYPE harmonia_compressed_copies_total counter",
            f"harmonia_compressed_copies_total {self._sum(_COPIES)}",
            "# HELP harmonia_compressed_copy_failures_total Copies the state directory or the store refused.",
            "# TYPE harmonia_compressed_copy_failures_total counter",
            f"harmonia_compressed_copy_failures_total {self._sum(_COPY_FAILURES)}",
            "# HELP harmonia_state_directory_degraded Workers serving live zstd streams because the "
            "state directory refuses copies (full, read-only).",
            "# TYPE harmonia_state_directory_degraded gauge",
            f"harmonia_state_directory_degraded {self._sum(_DEGRADED)}",
            "# HELP harmonia_workers Worker processes serving.",
            "# TYPE harmonia_workers gauge",
            f"harmonia_workers {self.workers}",
        ]
        return "\n".join(out) + "\n"
