"""Prometheus text: per-service traffic from access-log entries, node states, engine restarts."""

from __future__ import annotations

from sidecar.metrics import ServiceTraffic, parse, render


def test_traffic_and_rendering_round_trip() -> None:
    traffic = ServiceTraffic()
    for status, duration, size in ((200, 0.5, 1000), (206, 0.25, 10), (404, 0.1, 0), (502, 0.15, 0)):
        traffic.observe({"status": status, "duration": duration, "size": size, "bytes_read": 7})
    traffic.observe({"status": "weird"})
    text = render(
        engine_up=True,
        engine_restarts=3,
        node_states={"harmonia": "running", 'we"ird': "starting"},
        traffic={"harmonia": traffic},
    )
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in parse(text)}
    h = (("service", "harmonia"),)
    assert samples[("harmonia_sidecar_engine_up", ())] == 1
    assert samples[("harmonia_sidecar_engine_restarts_total", ())] == 3
    assert samples[("harmonia_sidecar_requests_total", (*h, ("status_class", "2xx")))] == 2
    assert samples[("harmonia_sidecar_requests_total", (*h, ("status_class", "4xx")))] == 1
    assert samples[("harmonia_sidecar_requests_total", (*h, ("status_class", "5xx")))] == 1
    assert samples[("harmonia_sidecar_requests_total", (*h, ("status_class", "other")))] == 1
    assert samples[("harmonia_sidecar_request_duration_seconds_sum", h)] == 1.0
    assert samples[("harmonia_sidecar_request_duration_seconds_count", h)] == 5
    assert samples[("harmonia_sidecar_response_bytes_total", h)] == 1010
    assert samples[("harmonia_sidecar_request_bytes_total", h)] == 28
    assert samples[("harmonia_sidecar_node_state", (*h, ("state", "running")))] == 1
    assert samples[("harmonia_sidecar_node_state", (*h, ("state", "starting")))] == 0
    assert 'service="we\\"ird"' in text
    assert text.endswith("\n")
