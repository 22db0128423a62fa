"""``harmonia-caddy``: print the public gateway's Caddyfile snippet, or a client host's settings.

    harmonia-caddy gateway --site harmonia.arsfeld.one \\
        --upstream https://harmonia.tail1234.ts.net --upstream http://100.64.0.5:5000
    harmonia-caddy gateway --site harmonia.arsfeld.one \\
        --upstream https://harmonia.tail1234.ts.net --via-tailnet gateway
    harmonia-caddy client --tailnet tail1234 --public-key-file /etc/harmonia/public.key

Output goes to stdout; configuration errors go to stderr, all at once, naming the flag, with exit
status 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from caddy.caddyfile import render_gateway
from caddy.client import (
    DEFAULT_KEY_NAME,
    DEFAULT_PRIORITY,
    ClientSettings,
    default_substituters,
    normalize_public_key,
    render_nix_conf,
    render_nixos,
)
from caddy.model import GatewaySite, Upstream
from caddy.policy import Policy
from common.problems import ConfigError, Problem

__all__ = ["main", "parse_size"]

_SIZE = re.compile(r"^(\d+)\s*([KMGT]i?B?|B)?$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_EXPOSABLE = ("serve", "log", "metrics", "push")


def parse_size(text: str) -> int | None:
    """``1048576``, ``64K``, ``1MiB``, ``2G`` (binary units) → bytes; ``none`` → no limit."""
    if text.strip().lower() == "none":
        return None
    match = _SIZE.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a size such as 1048576, 64K, 1MiB or 'none'")
    unit = (match.group(2) or "").upper()[:1]
    return int(match.group(1)) * _UNITS[unit]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harmonia-caddy",
        description="Render the Nix binary cache's frontends from one policy.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gw = sub.add_parser(
        "gateway",
        help="print a Caddyfile snippet (and a site block importing it) for the public gateway",
    )
    gw.add_argument("--site", required=True, help="site address, e.g. harmonia.arsfeld.one")
    gw.add_argument(
        "--upstream",
        action="append",
        required=True,
        metavar="URL",
        help="cache address, in order of preference (repeat); http://HOST:PORT or https://HOST",
    )
    gw.add_argument(
        "--via-tailnet",
        metavar="NODE",
        help="dial the upstreams through this caddy-tailscale node (transport tailscale NODE)",
    )
    gw.add_argument(
        "--expose",
        action="append",
        default=[],
        choices=_EXPOSABLE,
        help="also expose /serve/…, /log/…, /metrics or the cache's push routes /push/… publicly "
        "(repeat); default: none",
    )
    gw.add_argument(
        "--max-push-body",
        default="64GiB",
        metavar="SIZE",
        help="with --expose push: body limit of a push request, e.g. a NAR upload (default 64GiB; "
        "'none' for no limit); the other routes keep --max-body",
    )
    gw.add_argument(
        "--max-body",
        default="1MiB",
        metavar="SIZE",
        help="request body limit (default 1MiB; 'none' for no limit)",
    )
    gw.add_argument(
        "--allow-upload",
        action="store_true",
        help="allow methods other than GET and HEAD (default: refused with 405)",
    )
    gw.add_argument("--tls", metavar="internal|EMAIL", help="the site's tls directive")
    gw.add_argument(
        "--bind",
        action="append",
        default=[],
        metavar="ADDR",
        help="interface address the site listens on (repeat)",
    )
    gw.add_argument("--snippet-name", default="harmonia_gateway", metavar="NAME")
    gw.add_argument(
        "--log-output",
        metavar="stdout|stderr|PATH",
        help="access log output (default: Caddy's default logger)",
    )
    gw.add_argument("--no-access-log", action="store_true", help="do not log requests")
    gw.add_argument(
        "--no-compress", action="store_true", help="do not compress narinfo / nix-cache-info / .ls responses"
    )
    gw.add_argument(
        "--no-active-health-checks",
        action="store_true",
        help="no GET /nix-cache-info probes (with a single upstream a failed probe "
        "only keeps it marked down until the next one); passive checks stay",
    )

    cl = sub.add_parser("client", help="print nix.conf lines and a NixOS snippet for a client host")
    cl.add_argument(
        "--tailnet",
        metavar="NAME",
        help="tailnet name: adds the fleet's defaults https://harmonia.arsfeld.one "
        "and https://harmonia.NAME.ts.net",
    )
    cl.add_argument(
        "--substituter",
        action="append",
        default=[],
        metavar="URL",
        help="a frontend of the cache (repeat; replaces the fleet's defaults)",
    )
    cl.add_argument(
        "--public-key",
        action="append",
        default=[],
        metavar="NAME:BASE64",
        help="trusted public key of the cache (repeat)",
    )
    cl.add_argument(
        "--public-key-file",
        action="append",
        default=[],
        metavar="FILE",
        help="file holding a public key, e.g. from harmonia-cache key generate",
    )
    cl.add_argument(
        "--key-name",
        default=DEFAULT_KEY_NAME,
        help=f"name for a bare base64 key (default {DEFAULT_KEY_NAME})",
    )
    cl.add_argument(
        "--priority",
        type=int,
        default=DEFAULT_PRIORITY,
        help=f"substituter priority, lower is preferred (default {DEFAULT_PRIORITY})",
    )
    cl.add_argument(
        "--no-cache-nixos-org", action="store_true", help="do not add cache.nixos.org after our frontends"
    )
    cl.add_argument("--format", choices=("both", "nix.conf", "nixos"), default="both")
    return parser


def _gateway(args: argparse.Namespace) -> str:
    problems: list[Problem] = []
    node = args.via_tailnet
    if node is not None:
        try:
            Upstream("127.0.0.1:5000", node)
        except ConfigError:
            problems.append(
                Problem(
                    "--via-tailnet",
                    f"{node!r} is not a node name (letters, digits and '-', at most 63 characters)",
                )
            )
            node = None
    upstreams: tuple[Upstream, ...] = ()
    try:
        upstreams = Upstream.parse_all(args.upstream, node, key="--upstream")
    except ConfigError as exc:
        problems.extend(exc.problems)
    max_body: int | None = None
    try:
        max_body = parse_size(args.max_body)
    except ValueError as exc:
        problems.append(Problem("--max-body", str(exc)))
    max_push: int | None = None
    try:
        max_push = parse_size(args.max_push_body)
    except ValueError as exc:
        problems.append(Problem("--max-push-body", str(exc)))
    if max_push is not None and max_push < 1:
        problems.append(Problem("--max-push-body", "must be at least 1 byte, or 'none'"))
        max_push = None
    active_checks = not args.no_active_health_checks
    if active_checks and node is not None and any(u.scheme == "https" for u in upstreams):
        # caddy-tailscale's transport gives Caddy's health checker no TLS: its probes reach port 443
        # as plain HTTP, get 400, and the only upstream stays "down" (every request a 503). Passive
        # checks still see real failures.
        print(
            "harmonia-caddy: --via-tailnet with an https upstream: active health checks are off "
            "(the tailnet transport cannot probe over TLS); passive checks stay on",
            file=sys.stderr,
        )
        active_checks = False
    policy = Policy(
        expose_push="push" in args.expose,
        max_push_body_bytes=max_push,
        expose_serve="serve" in args.expose,
        expose_log="log" in args.expose,
        expose_metrics="metrics" in args.expose,
        allow_upload=args.allow_upload,
        max_request_body_bytes=max_body,
        compress_small_text=not args.no_compress,
        access_log=not args.no_access_log,
        active_health_checks=active_checks,
    )
    # the site-level settings are checked even when the upstreams were bad (all problems at once)
    stand_in = upstreams or (Upstream("127.0.0.1:5000"),)
    site: GatewaySite | None = None
    try:
        site = GatewaySite(
            site=args.site,
            upstreams=stand_in,
            policy=policy,
            snippet_name=args.snippet_name,
            tls=args.tls,
            bind=tuple(args.bind),
            log_output=args.log_output,
        )
    except ConfigError as exc:
        problems.extend(_flag_names(exc.problems))
    if problems or site is None:
        raise ConfigError(problems)
    return render_gateway(site)


#: GatewaySite's keys as the gateway command's flags
_GATEWAY_FLAGS = {
    "site": "--site",
    "upstreams": "--upstream",
    "snippet_name": "--snippet-name",
    "tls": "--tls",
    "log_output": "--log-output",
}


def _flag_names(problems: Sequence[Problem]) -> list[Problem]:
    out = []
    for problem in problems:
        if problem.key in _GATEWAY_FLAGS:
            problem = problem.renamed(_GATEWAY_FLAGS[problem.key])
        elif bind := re.fullmatch(r"bind\[(\d+)\]", problem.key):
            problem = problem.renamed(f"--bind #{bind.group(1)}")
        out.append(problem)
    return out


def _client(args: argparse.Namespace) -> str:
    problems: list[Problem] = []
    substituters: list[str] = list(args.substituter)
    if args.tailnet is not None:
        try:
            substituters = [*default_substituters(args.tailnet), *substituters]
        except ConfigError as exc:
            problems.extend(p.renamed(f"--{p.key}") for p in exc.problems)
    elif not substituters:
        problems.append(
            Problem(
                "--tailnet",
                "give the tailnet name (for https://harmonia.<tailnet>.ts.net) "
                "or list frontends with --substituter",
            )
        )
    keys: list[str] = []
    for i, text in enumerate(args.public_key):
        try:
            keys.append(normalize_public_key(text, args.key_name, where=f"--public-key #{i + 1}"))
        except ConfigError as exc:
            problems.extend(exc.problems)
    for name in args.public_key_file:
        try:
            text = Path(name).read_text()
        except OSError as exc:
            problems.append(Problem(f"--public-key-file {name}", f"cannot read: {exc.strerror}"))
            continue
        try:
            keys.append(normalize_public_key(text, args.key_name, where=f"--public-key-file {name}"))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if not args.public_key and not args.public_key_file:
        problems.append(Problem("--public-key", "give the cache's public key(s) (or --public-key-file)"))
    if problems:
        raise ConfigError(problems)
    try:
        settings = ClientSettings(
            substituters=tuple(substituters),
            public_keys=tuple(keys),
            priority=args.priority,
            include_cache_nixos_org=not args.no_cache_nixos_org,
        )
    except ConfigError as exc:
        raise ConfigError(
            [p.renamed("--priority") if p.key == "priority" else p for p in exc.problems]
        ) from None
    if args.format == "nix.conf":
        return render_nix_conf(settings)
    if args.format == "nixos":
        return render_nixos(settings)
    return (
        "# nix.conf (or NIX_CONFIG)\n"
        + render_nix_conf(settings)
        + "\n# NixOS (configuration.nix)\n"
        + render_nixos(settings)
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        text = _gateway(args) if args.command == "gateway" else _client(args)
    except ConfigError as exc:
        print(f"harmonia-caddy {args.command}: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
