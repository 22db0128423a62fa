"""Prometheus text for the sidecar: engine, nodes, and per-service traffic.

Pure. Traffic comes from the engine's access log rather than Caddy's own metrics: those are
labelled per handler, count a request once per handler it passes, and record the tagged-node
path (tailscale_auth's 401, then the re-serve) under the wrong status.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
STATES = ("running", "starting", "engine-down")


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


def parse(text: str) -> list[Sample]:
    out: list[Sample] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        out.append(Sample(m.group(1), labels, value))
    return out


@dataclass
class ServiceTraffic:
    """Counters for one service, fed from the engine's access log (one entry per request, with
    the status the client really got)."""

    requests: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    duration_sum: float = 0.0
    duration_count: float = 0.0
    response_bytes: float = 0.0
    request_bytes: float = 0.0

    def observe(self, entry: Mapping[str, object]) -> None:
        status = entry.get("status")
        code = str(status) if isinstance(status, int) else "0"
        self.requests[f"{code[0]}xx" if code[0] in "12345" else "other"] += 1
        self.duration_count += 1
        self.duration_sum += _number(entry.get("duration"))
        self.response_bytes += _number(entry.get("size"))
        self.request_bytes += _number(entry.get("bytes_read"))


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(
    *,
    engine_up: bool,
    engine_restarts: int,
    node_states: Mapping[str, str],
    traffic: Mapping[str, ServiceTraffic],
) -> str:
    lines = [
        "# HELP harmonia_sidecar_engine_up Whether the engine (Caddy with tsnet) is running.",
        "# TYPE harmonia_sidecar_engine_up gauge",
        f"harmonia_sidecar_engine_up {int(engine_up)}",
        "# HELP harmonia_sidecar_engine_restarts_total Times the engine died and was restarted.",
        "# TYPE harmonia_sidecar_engine_restarts_total counter",
        f"harmonia_sidecar_engine_restarts_total {engine_restarts}",
        "# HELP harmonia_sidecar_node_state 1 for the state each service's node is in.",
        "# TYPE harmonia_sidecar_node_state gauge",
    ]
    for service, state in sorted(node_states.items()):
        for candidate in STATES:
            lines.append(
                f'harmonia_sidecar_node_state{{service="{_esc(service)}",'
                f'state="{candidate}"}} {int(candidate == state)}'
            )
    lines += [
        "# HELP harmonia_sidecar_requests_total Requests answered, by status class.",
        "# TYPE harmonia_sidecar_requests_total counter",
    ]
    for service, t in sorted(traffic.items()):
        for cls in sorted(set(t.requests) | {"2xx", "3xx", "4xx", "5xx"}):
            lines.append(
                f'harmonia_sidecar_requests_total{{service="{_esc(service)}",'
                f'status_class="{cls}"}} {t.requests.get(cls, 0):g}'
            )
    lines += [
        "# HELP harmonia_sidecar_request_duration_seconds Time to answer requests.",
        "# TYPE harmonia_sidecar_request_duration_seconds summary",
    ]
    for service, t in sorted(traffic.items()):
        label = f'service="{_esc(service)}"'
        lines.append(f"harmonia_sidecar_request_duration_seconds_sum{{{label}}} {t.duration_sum:g}")
        lines.append(f"harmonia_sidecar_request_duration_seconds_count{{{label}}} {t.duration_count:g}")
    for name, attr, help_ in (
        ("harmonia_sidecar_response_bytes_total", "response_bytes", "Response body bytes sent."),
        ("harmonia_sidecar_request_bytes_total", "request_bytes", "Request body bytes received."),
    ):
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter"]
        for service, t in sorted(traffic.items()):
            lines.append(f'{name}{{service="{_esc(service)}"}} {getattr(t, attr):g}')
    return "\n".join(lines) + "\n"
