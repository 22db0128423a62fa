"""caddy.policy: the Policy's validation and the JSON fragments the sidecar compiles from."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from caddy.caddyfile import reverse_proxy_block
from caddy.model import Upstream
from caddy.policy import (
    IDENTITY_HEADER_PATTERNS,
    SMALL_TEXT_PATTERN,
    Policy,
    body_too_large_matcher,
    body_too_large_route,
    caddy_duration,
    encode_handler,
    exposed_path_pattern,
    identity_strip_handler,
    method_matcher,
    path_matcher,
    public_matcher,
    request_body_handler,
    request_header_strip_ops,
    reverse_proxy_handler,
    server_logs,
    server_routes,
    too_large_handler,
)
from common.problems import ConfigError, Problem

HASH = "0" * 32


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(2, "2s"), (2.0, "2s"), (0.25, "250ms"), (1.5, "1500ms"), (120, "120s"), (0.0001, "0.0001s")],
)
def test_caddy_duration(seconds: float, text: str) -> None:
    assert caddy_duration(seconds) == text


def test_public_defaults_are_the_documented_policy() -> None:
    policy = Policy()
    assert policy == Policy.public()
    assert (policy.expose_serve, policy.expose_log, policy.expose_metrics) == (False,) * 3
    assert policy.restrict_paths and not policy.allow_upload
    assert policy.health_path == "/nix-cache-info"
    assert policy.max_request_body_bytes == 1024 * 1024
    assert policy.strip_identity_headers and policy.compress_small_text and policy.access_log
    assert policy.try_duration_s > policy.dial_timeout_s  # room to fail over after a dial timeout


def test_tailnet_policy_exposes_everything() -> None:
    policy = Policy.tailnet()
    assert policy.expose_serve and policy.expose_log and policy.expose_metrics
    assert not policy.restrict_paths and policy.allow_upload
    assert path_matcher(policy) is None and method_matcher(policy) is None
    assert public_matcher(policy) is None
    assert policy.strip_identity_headers  # the sidecar strips, then sets its own
    assert Policy.tailnet(health_interval_s=1).health_interval_s == 1


def test_invalid_policy_lists_every_problem_with_its_key() -> None:
    with pytest.raises(ConfigError) as caught:
        Policy(
            dial_timeout_s=0,
            health_path="nix-cache-info",
            max_fails=0,  # type: ignore[arg-type]
            expose_serve="yes",
            max_request_body_bytes=-1,  # type: ignore[arg-type]
        )
    keys = sorted(p.key for p in caught.value.problems)
    assert keys == [
        "policy.dial_timeout_s",
        "policy.expose_serve",
        "policy.health_path",
        "policy.max_fails",
        "policy.max_request_body_bytes",
    ]
    assert "5 problems" in str(caught.value)
    for bad in (float("nan"), float("inf"), True, "2s"):
        with pytest.raises(ConfigError, match=r"policy\.health_interval_s"):
            Policy(health_interval_s=bad)  # type: ignore[arg-type]


def test_from_mapping_reads_config_and_rejects_unknown_keys() -> None:
    policy = Policy.from_mapping({"expose_metrics": True, "dial_timeout_s": 1})
    assert policy.expose_metrics and policy.dial_timeout_s == 1
    based = Policy.from_mapping({"allow_upload": False}, base=Policy.tailnet())
    assert based.expose_serve and not based.allow_upload
    with pytest.raises(ConfigError) as caught:
        Policy.from_mapping({"expose_everything": True, "health_interval_s": "5s"}, key="frontend")
    assert [p.key for p in caught.value.problems] == [
        "frontend.expose_everything",
        "frontend.health_interval_s",
    ]
    with pytest.raises(ConfigError, match="must be a table"):
        Policy.from_mapping([("a", 1)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("path", "public"),
    [
        ("/nix-cache-info", True),
        ("/health", True),
        (f"/{HASH}.narinfo", True),
        (f"/{HASH}.ls", True),
        ("/nar/1w5m3x7k.nar", True),
        ("/nar/1w5m3x7k.nar.zst", True),
        (f"/nar/{HASH}-1w5m3x7k.nar", True),
        ("/", False),
        ("/version", False),
        ("/metrics", False),
        (f"/serve/{HASH}/bin/x", False),
        (f"/log/{HASH}-x.drv", False),
        (f"/serve/{HASH}/x.narinfo", False),
        ("/nar/../serve/x", False),
        ("/serve/../nar/a.nar", False),
        ("//nix-cache-info", False),
        ("/nix-cache-info/", False),
        (f"/{HASH}.narinfo/x", False),
        ("/nar/", False),
        ("/nar/a.nar/../../x", False),
    ],
)
def test_exposed_paths_of_the_public_policy(path: str, public: bool) -> None:
    pattern = exposed_path_pattern(Policy())
    assert pattern is not None
    assert bool(re.fullmatch(pattern, path)) is public


@pytest.mark.parametrize(
    ("flag", "path"),
    [
        ("expose_serve", f"/serve/{HASH}/bin/x"),
        ("expose_log", f"/log/{HASH}-x.drv"),
        ("expose_metrics", "/metrics"),
    ],
)
def test_each_route_class_is_exposed_only_when_asked(flag: str, path: str) -> None:
    closed = exposed_path_pattern(Policy())
    opened = exposed_path_pattern(Policy(**{flag: True}))
    assert closed is not None and opened is not None
    assert not re.fullmatch(closed, path)
    assert re.fullmatch(opened, path)
    for other in ("/metrics", f"/serve/{HASH}/bin/x", f"/log/{HASH}-x.drv"):
        if other != path:
            assert not re.fullmatch(opened, other)


def test_small_text_pattern_never_matches_a_nar() -> None:
    assert re.fullmatch(SMALL_TEXT_PATTERN, f"/{HASH}.narinfo")
    assert re.fullmatch(SMALL_TEXT_PATTERN, "/nix-cache-info")
    assert not re.fullmatch(SMALL_TEXT_PATTERN, "/nar/1w5m3x7k.nar")
    assert not re.fullmatch(SMALL_TEXT_PATTERN, "/nar/1w5m3x7k.nar.zst")


def test_path_matcher_checks_the_cleaned_and_the_raw_path() -> None:
    matcher = path_matcher(Policy())
    assert matcher is not None
    pattern = matcher["path_regexp"]["pattern"]
    assert matcher["expression"] == '{http.request.uri.path}.matches("' + pattern + '")'
    assert "\\" not in pattern and "{" not in pattern  # safe in JSON, CEL and Caddyfile alike
    assert public_matcher(Policy()) == {**matcher, "method": ["GET", "HEAD"]}
    assert method_matcher(Policy(allow_upload=True)) is None


def test_identity_headers_are_stripped_by_prefix() -> None:
    ops = request_header_strip_ops()
    assert ops == {"delete": list(IDENTITY_HEADER_PATTERNS)}
    assert {"X-Tailscale-*", "Tailscale-*"} <= set(ops["delete"])
    assert identity_strip_handler() == {"handler": "headers", "request": ops}


def test_body_limit_fragments() -> None:
    assert request_body_handler(Policy()) == {"handler": "request_body", "max_size": 1048576}
    assert request_body_handler(Policy(max_request_body_bytes=None)) is None
    matcher = body_too_large_matcher(Policy(max_request_body_bytes=10))
    assert matcher is not None and matcher["expression"].endswith("> 10")
    assert body_too_large_matcher(Policy(max_request_body_bytes=None)) is None


def test_encode_only_small_text_and_only_when_asked() -> None:
    handler = encode_handler(Policy())
    assert handler is not None
    assert handler["handler"] == "encode"
    assert handler["match"] == {"headers": {"Content-Type": ["text/*", "application/json*"]}}
    assert encode_handler(Policy(compress_small_text=False)) is None


def test_reverse_proxy_handler_streams_fails_over_and_sets_no_response_deadline() -> None:
    ups = [Upstream("http://127.0.0.1:5000"), Upstream("10.0.0.2:5000")]
    handler = reverse_proxy_handler(Policy(), ups)
    assert handler["handler"] == "reverse_proxy"
    assert handler["flush_interval"] == -1
    assert handler["upstreams"] == [{"dial": "127.0.0.1:5000"}, {"dial": "10.0.0.2:5000"}]
    assert handler["load_balancing"]["selection_policy"] == {"policy": "first"}
    assert handler["load_balancing"]["try_duration"] == 4_000_000_000
    assert handler["health_checks"]["active"]["uri"] == "/nix-cache-info"
    assert handler["health_checks"]["passive"]["unhealthy_status"] == [502, 503, 504]
    transport = handler["transport"]
    assert transport["protocol"] == "http"
    assert transport["dial_timeout"] == 2_000_000_000
    assert transport["compression"] is False
    assert "read_timeout" not in transport and "write_timeout" not in transport
    assert "tls" not in transport
    assert "request_buffers" not in handler and "buffer_requests" not in handler
    no_header_deadline = reverse_proxy_handler(Policy(response_header_timeout_s=None), ups)
    assert "response_header_timeout" not in no_header_deadline["transport"]


def test_reverse_proxy_transports() -> None:
    tls = reverse_proxy_handler(Policy(), [Upstream("https://harmonia.tail1234.ts.net")])
    assert tls["transport"]["tls"] == {}
    assert tls["upstreams"] == [{"dial": "harmonia.tail1234.ts.net:443"}]
    via = reverse_proxy_handler(Policy(), [Upstream("https://harmonia.tail1234.ts.net", "gw")])
    assert via["transport"] == {"protocol": "tailscale", "name": "gw", "tls": {}}


def test_reverse_proxy_rejects_mixed_transports_and_empty_lists() -> None:
    with pytest.raises(ConfigError, match="same scheme and tailnet node"):
        reverse_proxy_handler(Policy(), [Upstream("https://a.example"), Upstream("http://b:1")])
    with pytest.raises(ConfigError, match="same scheme and tailnet node"):
        reverse_proxy_handler(Policy(), [Upstream("http://a:1", "n"), Upstream("http://b:1")])
    with pytest.raises(ConfigError, match="at least one"):
        reverse_proxy_handler(Policy(), [])


def test_server_routes_order_for_the_sidecar() -> None:
    identity = {"handler": "headers", "request": {"set": {"X-Tailscale-User": ["alice"]}}}
    routes = server_routes(Policy(), [Upstream("127.0.0.1:5000")], after_strip=[identity])
    handlers = [r["handle"][0]["handler"] for r in routes]
    assert handlers == [
        "headers",
        "headers",
        "request_body",
        "static_response",
        "subroute",
        "static_response",
        "static_response",
    ]
    assert routes[0]["handle"][0] == identity_strip_handler()
    assert routes[1]["handle"][0] == identity  # after the strip, so it survives
    assert routes[3]["handle"][0]["status_code"] == 413
    assert routes[4]["match"] == [public_matcher(Policy())]
    assert routes[5]["handle"][0]["status_code"] == 405
    assert routes[6]["handle"][0]["status_code"] == 404
    assert all(r.get("terminal") for r in routes[3:])


def test_server_routes_of_the_tailnet_policy_proxy_everything() -> None:
    routes = server_routes(Policy.tailnet(), [Upstream("127.0.0.1:5000")])
    main = [r for r in routes if r["handle"][0]["handler"] == "subroute"]
    assert len(main) == 1 and "match" not in main[0]
    assert not any(r["handle"][0].get("status_code") in (404, 405) for r in routes)
    no_strip = server_routes(Policy.tailnet(strip_identity_headers=False), [Upstream("h:1")])
    assert identity_strip_handler() not in [r["handle"][0] for r in no_strip]


def test_server_logs() -> None:
    assert server_logs(Policy()) == {}
    assert server_logs(Policy(access_log=False)) is None


def test_a_group_with_a_fallback_is_tried_once_per_upstream() -> None:
    ups = [Upstream("https://a.example"), Upstream("https://b.example")]
    assert reverse_proxy_handler(Policy(), ups, fallback_follows=True)["load_balancing"] == {
        "selection_policy": {"policy": "first"},
        "retries": 1,
    }
    single = reverse_proxy_handler(Policy(), ups[:1], fallback_follows=True)
    assert single["load_balancing"] == {"selection_policy": {"policy": "first"}}


_VALUES = st.one_of(
    st.booleans(),
    st.integers(-5, 10**12),
    st.floats(allow_nan=True),
    st.none(),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.sampled_from([*sorted(f.name for f in fields(Policy)), "bogus"]), _VALUES, max_size=6)
)
def test_from_mapping_either_builds_a_renderable_policy_or_raises_config_error(
    data: dict[str, object],
) -> None:
    problems: tuple[Problem, ...] = ()
    policy = None
    try:
        policy = Policy.from_mapping(data)
    except ConfigError as exc:  # any other exception fails the test
        problems = exc.problems
    if policy is None:
        assert problems
        assert all(p.key.startswith("policy.") for p in problems)
        return
    assert all(getattr(policy, k) == v for k, v in data.items())
    routes = server_routes(policy, [Upstream("127.0.0.1:5000")])
    assert routes[-1]["terminal"]


@pytest.mark.parametrize(("active", "passive"), [(True, True), (False, True), (True, False), (False, False)])
def test_health_checks_can_be_left_out(active: bool, passive: bool) -> None:
    policy = Policy(active_health_checks=active, passive_health_checks=passive)
    ups = [Upstream("http://127.0.0.1:5000")]
    handler = reverse_proxy_handler(policy, ups)
    checks = handler.get("health_checks", {})
    assert ("active" in checks) is active
    assert ("passive" in checks) is passive
    assert ("health_checks" in handler) is (active or passive)  # no empty object
    text = "\n".join(reverse_proxy_block(policy, ups))
    assert ("health_uri" in text) is active
    assert ("health_interval" in text) is active
    assert ("fail_duration" in text) is passive
    assert ("unhealthy_status" in text) is passive
    assert handler["flush_interval"] == -1  # the rest is unchanged


def test_health_switches_are_read_from_config() -> None:
    policy = Policy.from_mapping({"active_health_checks": False}, base=Policy.tailnet())
    assert not policy.active_health_checks and policy.passive_health_checks
    with pytest.raises(ConfigError, match=r"policy\.passive_health_checks"):
        Policy.from_mapping({"passive_health_checks": "no"})


def test_body_too_large_route_is_the_matcher_and_the_413() -> None:
    policy = Policy(max_request_body_bytes=10)
    assert body_too_large_route(policy) == {
        "match": [body_too_large_matcher(policy)],
        "handle": [too_large_handler()],
        "terminal": True,
    }
    assert too_large_handler()["status_code"] == 413
    assert body_too_large_route(Policy(max_request_body_bytes=None)) is None
    assert body_too_large_route(policy) in server_routes(policy, [Upstream("127.0.0.1:1")])
