"""One proxy policy for both frontends of the cache, and its rendering as Caddy JSON fragments.

The cache has two frontends: the tailnet node published by ``sidecar/`` (a Caddy + tsnet engine
whose JSON config the sidecar compiles) and the public gateway (a Caddyfile snippet rendered by
:mod:`caddy.caddyfile`). Both are rendered from a :class:`Policy` by the pure functions here, so
they cannot drift. Standard library only; no I/O.

The policy, rule by rule (each rule names the Caddy setting it becomes):

1. **Stream, never buffer.** ``flush_interval -1`` (every write flushed at once); request bodies
   are never buffered (Caddy's default; no ``request_buffers``/``buffer_requests`` is rendered).
2. **No response deadline.** Only ``dial_timeout`` (short) and ``response_header_timeout`` (the
   wait for the *headers*) are set; no read/write timeout can cut a multi-GB NAR mid-body.
   **Expect: 100-continue end to end** (``expect_continue_timeout_s``): a request that asks for
   it (every PUT of a pushing Nix) has its body held until the *cache* answers ``100 Continue``,
   so the cache refuses a bad token or an oversized NAR before a byte of it is sent (without
   this Caddy answers 100 itself at once); past the timeout the body goes anyway. The
   caddy-tailscale transport (``transport tailscale``) has no such setting.
3. **Compress only small text.** ``encode zstd gzip`` runs only for ``/nix-cache-info``,
   ``/<hash>.narinfo`` and ``/<hash>.ls`` responses whose Content-Type is text or JSON, and only
   above ``compress_min_bytes``. NARs are never re-compressed. A response that already carries a
   ``Content-Encoding`` (harmonia's zstd) passes through untouched (Caddy's ``encode`` skips it),
   and the proxy transport has ``compression off`` so the client's ``Accept-Encoding`` reaches the
   cache as sent and nothing is transparently decoded.
4. **Health and failover.** Load balancing ``first`` (the first available upstream in the listed
   order), retried for ``try_duration_s`` every ``try_interval_s``; active health checks
   (``GET health_path`` every ``health_interval_s``, expecting 200) and passive ones (a dial
   failure or a 502/503/504 marks an upstream down for ``fail_duration_s`` after ``max_fails``).
   ``active_health_checks`` / ``passive_health_checks`` switch either off: a frontend with a
   single upstream (the sidecar's services) gains nothing from them but false 503s, and the
   active check's ``health_path`` is the cache's, not any service's.
5. **Request body limit.** ``max_request_body_bytes`` (``None`` = none): a request announcing a
   larger ``Content-Length`` is answered 413 before anything is proxied; ``request_body
   max_size`` cuts a chunked body that grows past it (that request then fails with 502).
6. **Forwarding headers.** Caddy sets ``X-Forwarded-For`` / ``-Proto`` / ``-Host`` itself and,
   without ``trusted_proxies``, replaces any value a client sent. ``Host`` becomes the upstream's
   own ``host:port`` (so a TLS upstream such as the sidecar's ts.net node sees its own name).
7. **Identity headers never come from outside.** Every incoming ``X-Tailscale-*`` and
   ``Tailscale-*`` header (``Tailscale-User-Login``… as Tailscale Serve sets them; the ``_``
   spellings too) is deleted before anything else runs (:func:`request_header_strip_ops`). The
   sidecar then sets its own identity headers *after* the strip (see :func:`server_routes`).
8. **Exposed routes.** The public side answers only the binary-cache protocol —
   ``/nix-cache-info``, ``/<hash>.narinfo``, ``/nar/…``, ``/<hash>.ls``, ``/health`` — with GET and
   HEAD; ``/serve/…``, ``/log/…`` and ``/metrics`` only when ``expose_serve`` / ``expose_log`` /
   ``expose_metrics``; anything else is 404 (405 for another method on a public path). The path is
   checked both after Caddy's cleaning (``path_regexp``) and as sent (a CEL ``expression``), so
   ``/serve/../nar/x.nar`` style paths do not slip through. :meth:`Policy.tailnet` exposes every
   route and every method.
9. **Access logs** (``access_log``): Caddy's access log for the server/site.
10. **Push** (``expose_push``; off on the public gateway unless asked; the tailnet node proxies
   every path, ``/push`` included, and turns this on to restrict who may push): ``/push`` and
   everything under it (the cache's upload routes) with GET, HEAD and PUT get a
   route of their own, ahead of the body limit: its own limit ``max_push_body_bytes`` (large:
   NAR uploads), its own 413, no compression, and the request body streamed to the cache as it
   arrives (no request buffering). A frontend can restrict it to some callers (the sidecar's
   ``push_allow``): everyone else gets 403 before any body is read. A push PUT that fails in the
   frontend itself (the cache unreachable, a timeout) is answered 424, never a 5xx, 408 or 429:
   Nix ≤ 2.33.1 answers those by re-sending the upload with an empty body and hanging
   (NixOS/nix #15023).

API (what ``sidecar/`` builds on):

- :class:`Policy` — frozen; ``Policy()`` / :meth:`Policy.public` is the public gateway's,
  :meth:`Policy.tailnet` the tailnet node's; :meth:`Policy.from_mapping` reads one from config
  (rejects unknown keys, lists every problem).
- JSON fragments (dicts ready for ``json.dumps``; durations in nanoseconds, as Caddy emits them):
  :func:`reverse_proxy_handler`, :func:`request_header_strip_ops`, :func:`identity_strip_handler`,
  :func:`request_body_handler`, :func:`body_too_large_matcher`, :func:`body_too_large_route`,
  :func:`encode_handler`,
  :func:`small_text_matcher`, :func:`path_matcher`, :func:`method_matcher`,
  :func:`public_matcher`, :func:`server_logs`.
- The proxy chain, one order for both frontends: :func:`chain_steps` (strip → the frontend's
  identity headers → body limit → 413 → exposed routes with compression and the proxy → 405 →
  404), rendered as JSON by :func:`server_routes` — the whole ``routes`` list of one Caddy HTTP
  server, with the hooks the sidecar needs (identity headers after the strip, prefixes and
  their strip, the upstream's base path, dial, TLS name and extra headers) — and as Caddyfile
  directives by :func:`caddy.caddyfile.render_snippet`. The sidecar ships ``server_routes``
  as each service's ``proxy`` route.
- The Caddyfile form of the same rules is in :mod:`caddy.caddyfile`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from enum import Enum
from typing import Any, Protocol

from common.problems import ConfigError, Problem, raise_if

__all__ = [
    "CACHE_PATH_PATTERNS",
    "IDENTITY_HEADER_PATTERNS",
    "SMALL_TEXT_PATTERN",
    "Policy",
    "ProxyTarget",
    "Step",
    "body_too_large_matcher",
    "body_too_large_route",
    "caddy_duration",
    "chain_steps",
    "encode_handler",
    "exposed_path_pattern",
    "health_checks",
    "identity_strip_handler",
    "load_balancing",
    "method_matcher",
    "not_found_handler",
    "path_matcher",
    "public_matcher",
    "push_body_handler",
    "push_failed_route",
    "push_forbidden_handler",
    "push_matcher",
    "push_too_large_route",
    "regex_escape",
    "request_body_handler",
    "request_header_strip_ops",
    "reverse_proxy_handler",
    "server_logs",
    "server_routes",
    "small_text_matcher",
    "too_large_handler",
]

#: Regex alternatives (anchored by :func:`exposed_path_pattern`) of the binary-cache protocol.
#: No backslashes or braces, so the same text is safe in JSON, CEL strings and Caddyfile tokens.
CACHE_PATH_PATTERNS: tuple[str, ...] = (
    "nix-cache-info",
    "health",
    "[0-9a-z]+[.]narinfo",
    "[0-9a-z]+[.]ls",
    "nar/[0-9a-z-]+[.]nar([.][0-9a-z]+)?",
)
SERVE_PATH_PATTERN = "serve/.+"
LOG_PATH_PATTERN = "log/.+"
METRICS_PATH_PATTERN = "metrics"

#: Small text responses worth compressing: nix-cache-info, narinfo and .ls listings.
SMALL_TEXT_PATTERN = "^/(nix-cache-info|[0-9a-z]+[.](narinfo|ls))$"
#: Response Content-Types that may be compressed (Caddy response-matcher wildcards).
SMALL_TEXT_CONTENT_TYPES: tuple[str, ...] = ("text/*", "application/json*")

#: Incoming request headers deleted before anything else (case-insensitive prefix matches).
IDENTITY_HEADER_PATTERNS: tuple[str, ...] = (
    "X-Tailscale-*",
    "Tailscale-*",
    "X_Tailscale_*",
    "Tailscale_*",
)

UPSTREAM_HOST_PLACEHOLDER = "{http.reverse_proxy.upstream.hostport}"
PUBLIC_MATCHER_NAME = "harmonia_public"
READ_METHODS: tuple[str, ...] = ("GET", "HEAD")
#: Statuses from an upstream that count as that upstream failing (passive health).
UNHEALTHY_STATUSES: tuple[int, ...] = (502, 503, 504)

_MIB = 1024 * 1024
_GIB = 1024 * _MIB

NOT_FOUND_BODY = "404 page not found\n"  # Go's (and so tsnsrv's) text
METHOD_NOT_ALLOWED_BODY = "405 method not allowed\n"
PLAIN_TEXT = "text/plain; charset=utf-8"


class ProxyTarget(Protocol):
    """What the proxy fragments need of an upstream (:class:`caddy.model.Upstream` is one).

    A protocol rather than an import: ``caddy.model`` builds on this module, not the reverse.
    """

    @property
    def url(self) -> str: ...

    @property
    def dial(self) -> str: ...

    @property
    def tailnet_node(self) -> str | None: ...

    @property
    def tls(self) -> bool: ...

    @property
    def transport_key(self) -> tuple[str, str | None]: ...


def caddy_duration(seconds: float) -> str:
    """A Caddyfile duration: ``3s``, ``250ms``, ``1.5s``."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    ms = seconds * 1000
    if abs(ms - round(ms)) < 1e-9:
        return f"{round(ms)}ms"
    return f"{seconds:g}s"


def _ns(seconds: float) -> int:
    return round(seconds * 1_000_000_000)


@dataclass(frozen=True)
class Policy:
    """How a frontend proxies to the cache. Defaults are the public gateway's.

    Route classes: the binary-cache protocol is always exposed; ``expose_serve``,
    ``expose_log`` and ``expose_metrics`` add ``/serve/…``, ``/log/…`` and ``/metrics``;
    ``restrict_paths=False`` drops the path filter altogether (every route of the cache, ``/`` and
    ``/version`` included). ``allow_upload`` allows methods other than GET and HEAD.
    Durations are seconds; sizes bytes.
    """

    expose_serve: bool = False
    expose_log: bool = False
    expose_metrics: bool = False
    expose_push: bool = False
    restrict_paths: bool = True
    allow_upload: bool = False
    max_request_body_bytes: int | None = _MIB
    max_push_body_bytes: int | None = 64 * _GIB
    dial_timeout_s: float = 2.0
    response_header_timeout_s: float | None = 120.0
    expect_continue_timeout_s: float | None = 5.0
    active_health_checks: bool = True
    passive_health_checks: bool = True
    health_path: str = "/nix-cache-info"
    health_interval_s: float = 5.0
    health_timeout_s: float = 3.0
    fail_duration_s: float = 10.0
    max_fails: int = 1
    try_duration_s: float = 4.0
    try_interval_s: float = 0.25
    compress_small_text: bool = True
    compress_min_bytes: int = 512
    strip_identity_headers: bool = True
    access_log: bool = True

    def __post_init__(self) -> None:
        raise_if(self.problems())

    def problems(self, key: str = "policy") -> list[Problem]:
        """Every reason this policy cannot be rendered, each naming its key."""
        problems: list[Problem] = []
        for f in fields(self):
            value = getattr(self, f.name)
            where = f"{key}.{f.name}"
            if f.type == "bool":
                if not isinstance(value, bool):
                    problems.append(Problem(where, f"must be true or false, not {value!r}"))
            elif f.name.endswith("_s"):
                optional = "None" in str(f.type)
                if value is None and optional:
                    continue
                if (
                    isinstance(value, bool)
                    or not isinstance(value, int | float)
                    or not math.isfinite(value)
                    or value <= 0
                ):
                    problems.append(Problem(where, f"must be a positive number of seconds, not {value!r}"))
                elif value > 86400 * 365:
                    problems.append(Problem(where, f"{value!r} seconds is unreasonably long"))
            elif f.name in (
                "max_request_body_bytes",
                "max_push_body_bytes",
                "compress_min_bytes",
                "max_fails",
            ):
                if value is None and f.name in ("max_request_body_bytes", "max_push_body_bytes"):
                    continue
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    problems.append(Problem(where, f"must be a positive integer, not {value!r}"))
        path = self.health_path
        if (
            not isinstance(path, str)
            or not path.startswith("/")
            or any(c.isspace() or c in "{}\"'`#?" for c in path)
        ):
            problems.append(
                Problem(
                    f"{key}.health_path",
                    f"{path!r} must be an absolute path without spaces, braces, quotes or a query",
                )
            )
        return problems

    @classmethod
    def public(cls, **overrides: Any) -> Policy:
        """The public gateway's policy (same as ``Policy()``), with optional overrides."""
        return cls(**overrides)

    @classmethod
    def tailnet(cls, **overrides: Any) -> Policy:
        """The tailnet node's policy: every route and method exposed, uploads up to 64 GiB."""
        base = cls(
            expose_serve=True,
            expose_log=True,
            expose_metrics=True,
            restrict_paths=False,
            allow_upload=True,
            max_request_body_bytes=64 * _GIB,
        )
        return replace(base, **overrides) if overrides else base

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], key: str = "policy", base: Policy | None = None) -> Policy:
        """Read a policy from config (e.g. TOML), over ``base`` (default: the public policy).

        Unknown keys and bad values are all reported at once, each with its key.
        """
        if not isinstance(data, Mapping):
            raise ConfigError([Problem(key, f"must be a table of settings, not {type(data).__name__}")])
        known = {f.name for f in fields(cls)}
        problems = [
            Problem(f"{key}.{name}", f"unknown setting (known: {', '.join(sorted(known))})")
            for name in data
            if name not in known
        ]
        values = {name: value for name, value in data.items() if name in known}
        start = base if base is not None else cls()
        merged = {f.name: getattr(start, f.name) for f in fields(cls)} | values
        candidate = object.__new__(cls)
        for name, value in merged.items():
            object.__setattr__(candidate, name, value)
        problems.extend(candidate.problems(key))
        raise_if(problems)
        return cls(**merged)


# ---------------------------------------------------------------------------------------------
# Route classes


def exposed_path_pattern(policy: Policy) -> str | None:
    """The anchored regex of the paths this policy exposes, or ``None`` for every path."""
    if not policy.restrict_paths:
        return None
    alternatives = list(CACHE_PATH_PATTERNS)
    if policy.expose_serve:
        alternatives.append(SERVE_PATH_PATTERN)
    if policy.expose_log:
        alternatives.append(LOG_PATH_PATTERN)
    if policy.expose_metrics:
        alternatives.append(METRICS_PATH_PATTERN)
    return "^/(" + "|".join(alternatives) + ")$"


def path_expression(pattern: str) -> str:
    """CEL expression checking the request path *as sent* (decoded, not cleaned)."""
    return '{http.request.uri.path}.matches("' + pattern + '")'


def path_matcher(policy: Policy) -> dict[str, Any] | None:
    """Caddy matcher fields restricting the path to the exposed routes; ``None``: no restriction.

    Two conditions, both required: ``path_regexp`` (Caddy cleans the path first, so ``//`` and
    ``..`` tricks cannot dodge it) and a CEL ``expression`` on the uncleaned path (so a path that
    only *cleans* into a public one is refused too, since the upstream receives it uncleaned).
    """
    pattern = exposed_path_pattern(policy)
    if pattern is None:
        return None
    return {
        "path_regexp": {"name": PUBLIC_MATCHER_NAME, "pattern": pattern},
        "expression": path_expression(pattern),
    }


def method_matcher(policy: Policy) -> dict[str, Any] | None:
    """``{"method": ["GET", "HEAD"]}`` unless uploads are allowed (then ``None``)."""
    return None if policy.allow_upload else {"method": list(READ_METHODS)}


def public_matcher(policy: Policy) -> dict[str, Any] | None:
    """One matcher set: exposed path and allowed method. ``None`` when everything is allowed."""
    combined: dict[str, Any] = {}
    combined.update(path_matcher(policy) or {})
    combined.update(method_matcher(policy) or {})
    return combined or None


def small_text_matcher() -> dict[str, Any]:
    """Request matcher of the small text responses that may be compressed."""
    return {"path_regexp": {"name": "harmonia_text", "pattern": SMALL_TEXT_PATTERN}}


# ---------------------------------------------------------------------------------------------
# Handlers


def request_header_strip_ops() -> dict[str, Any]:
    """Caddy header ops deleting every incoming identity header (``X-Tailscale-*``, ``Tailscale-*``)."""
    return {"delete": list(IDENTITY_HEADER_PATTERNS)}


def identity_strip_handler() -> dict[str, Any]:
    """A ``headers`` handler applying :func:`request_header_strip_ops` to the request."""
    return {"handler": "headers", "request": request_header_strip_ops()}


def too_large_expression(limit: int | None) -> str | None:
    """CEL: the request announces a body over ``limit`` (``Content-Length``), or ``None``."""
    if limit is None:
        return None
    length = "{http.request.header.Content-Length}"
    return f'{length} != "" && int({length}) > {limit}'


def body_too_large_expression(policy: Policy) -> str | None:
    """CEL: the request announces a body over the limit (``Content-Length``), or ``None``."""
    return too_large_expression(policy.max_request_body_bytes)


def body_too_large_matcher(policy: Policy) -> dict[str, Any] | None:
    """Matcher of requests whose ``Content-Length`` is over the limit (answered 413 at once).

    A chunked body without ``Content-Length`` is cut by :func:`request_body_handler` instead;
    the proxy then fails that request (502), and the upstream sees a truncated upload.
    """
    expression = body_too_large_expression(policy)
    return None if expression is None else {"expression": expression}


TOO_LARGE_BODY = "413 request body too large"


def too_large_handler() -> dict[str, Any]:
    """The ``static_response`` answering a body over the limit (413)."""
    return {"handler": "static_response", "status_code": 413, "body": TOO_LARGE_BODY}


def body_too_large_route(policy: Policy) -> dict[str, Any] | None:
    """The route answering 413 at once to a ``Content-Length`` over the limit, or ``None``.

    ``{"match": [body_too_large_matcher], "handle": [too_large_handler], "terminal": True}``:
    put it after :func:`request_body_handler` and before anything that proxies (the public
    gateway's ``handle @harmonia_too_large``; the sidecar's proxy route).
    """
    matcher = body_too_large_matcher(policy)
    if matcher is None:
        return None
    return {"match": [matcher], "handle": [too_large_handler()], "terminal": True}


def request_body_handler(policy: Policy) -> dict[str, Any] | None:
    """The ``request_body`` handler enforcing ``max_request_body_bytes`` (``None``: no limit)."""
    if policy.max_request_body_bytes is None:
        return None
    return {"handler": "request_body", "max_size": policy.max_request_body_bytes}


# ---------------------------------------------------------------------------------------------
# Push: the cache's upload routes under /push


PUSH_PATH_PATTERN = "^/push(/.*)?$"
PUSH_MATCHER_NAME = "harmonia_push"
#: What a pushing Nix client sends (nix copy --to): GET/HEAD to look, PUT to upload.
PUSH_METHODS: tuple[str, ...] = ("GET", "HEAD", "PUT")
PUSH_FORBIDDEN_BODY = "403 this caller may not push here\n"


def push_matcher(policy: Policy) -> dict[str, Any] | None:
    """Matcher of push requests (``/push`` and below, cleaned and as sent, with the push methods
    unless uploads are allowed everywhere), or ``None`` when push is not exposed."""
    if not policy.expose_push:
        return None
    matcher: dict[str, Any] = {
        "path_regexp": {"name": PUSH_MATCHER_NAME, "pattern": PUSH_PATH_PATTERN},
        "expression": path_expression(PUSH_PATH_PATTERN),
    }
    if not policy.allow_upload:
        matcher["method"] = list(PUSH_METHODS)
    return matcher


def push_body_handler(policy: Policy) -> dict[str, Any] | None:
    """``request_body`` for push requests: ``max_push_body_bytes`` (``None``: no limit)."""
    if policy.max_push_body_bytes is None:
        return None
    return {"handler": "request_body", "max_size": policy.max_push_body_bytes}


def push_too_large_route(policy: Policy) -> dict[str, Any] | None:
    """413 at once for a push whose ``Content-Length`` is over ``max_push_body_bytes``."""
    expression = too_large_expression(policy.max_push_body_bytes)
    if expression is None:
        return None
    return {"match": [{"expression": expression}], "handle": [too_large_handler()], "terminal": True}


#: Statuses Nix ≤ 2.33.1 answers by re-sending a PUT with an empty body and hanging (NixOS/nix
#: #15023); a push PUT that fails in the frontend itself (cache down, timeout) gets 424 instead.
PUSH_HANGING_STATUSES: tuple[int, ...] = (500, 502, 503, 504, 408, 429)
PUSH_FAILED_STATUS = 424
PUSH_FAILED_BODY = (
    "424 the cache behind this frontend did not answer; try again later "
    "(not a 5xx: Nix would re-send the upload empty and hang)\n"
)


def push_failed_expression() -> str:
    """CEL, in an error route: the frontend's own error is one that would hang a pushing Nix."""
    return "{http.error.status_code} in [" + ", ".join(str(s) for s in PUSH_HANGING_STATUSES) + "]"


def push_failed_route(*, on_push_paths: bool = False) -> dict[str, Any]:
    """The error route answering a failed push PUT with 424 rather than Caddy's 5xx.

    Inside the push route the path is already matched; ``on_push_paths`` adds the push paths to
    the matcher, for an error handler that sees every request (the sidecar's).
    """
    match: dict[str, Any] = {"method": ["PUT"], "expression": push_failed_expression()}
    if on_push_paths:
        match["path_regexp"] = {"name": PUSH_MATCHER_NAME, "pattern": PUSH_PATH_PATTERN}
        match["expression"] = f"{path_expression(PUSH_PATH_PATTERN)} && {push_failed_expression()}"
    return {
        "match": [match],
        "handle": [
            {
                "handler": "static_response",
                "status_code": PUSH_FAILED_STATUS,
                "headers": {"Content-Type": [PLAIN_TEXT]},
                "body": PUSH_FAILED_BODY,
            }
        ],
    }


def push_forbidden_handler() -> dict[str, Any]:
    return {
        "handler": "static_response",
        "status_code": 403,
        "headers": {"Content-Type": [PLAIN_TEXT]},
        "body": PUSH_FORBIDDEN_BODY,
    }


def encode_handler(policy: Policy) -> dict[str, Any] | None:
    """The ``encode`` handler for small text (use it under :func:`small_text_matcher`)."""
    if not policy.compress_small_text:
        return None
    return {
        "handler": "encode",
        "encodings": {"zstd": {}, "gzip": {}},
        "prefer": ["zstd", "gzip"],
        "minimum_length": policy.compress_min_bytes,
        "match": {"headers": {"Content-Type": list(SMALL_TEXT_CONTENT_TYPES)}},
    }


def _transport(policy: Policy, upstreams: Sequence[ProxyTarget]) -> dict[str, Any]:
    first = upstreams[0]
    transport: dict[str, Any]
    if first.tailnet_node is not None:
        # caddy-tailscale's transport has no timeouts of its own; it dials through tsnet
        transport = {"protocol": "tailscale", "name": first.tailnet_node}
    else:
        transport = {"protocol": "http", "dial_timeout": _ns(policy.dial_timeout_s)}
        if policy.response_header_timeout_s is not None:
            transport["response_header_timeout"] = _ns(policy.response_header_timeout_s)
        if policy.expect_continue_timeout_s is not None:
            transport["expect_continue_timeout"] = _ns(policy.expect_continue_timeout_s)
        transport["compression"] = False
    if first.tls:
        transport["tls"] = {}
    return transport


def load_balancing(
    policy: Policy, upstreams: Sequence[ProxyTarget], *, fallback_follows: bool = False
) -> dict[str, Any]:
    """``first`` available upstream, retried for ``try_duration_s``.

    With ``fallback_follows`` (another group of upstreams takes over when this one fails, see
    :mod:`caddy.caddyfile`), each upstream of the group is tried once, without waiting, so the
    fallback is reached at once instead of after the retry window.
    """
    if fallback_follows:
        lb: dict[str, Any] = {"selection_policy": {"policy": "first"}}
        if len(upstreams) > 1:
            lb["retries"] = len(upstreams) - 1
        return lb
    return {
        "selection_policy": {"policy": "first"},
        "try_duration": _ns(policy.try_duration_s),
        "try_interval": _ns(policy.try_interval_s),
    }


def reverse_proxy_handler(
    policy: Policy,
    upstreams: Sequence[ProxyTarget],
    *,
    fallback_follows: bool = False,
    dials: Sequence[str] | None = None,
    upstream_tls: Mapping[str, Any] | None = None,
    request_headers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The ``"handler": "reverse_proxy"`` object for upstreams sharing one transport.

    ``fallback_follows``: another group takes over when this one fails (see
    :func:`load_balancing`). The transport hooks of a frontend whose upstream is not a plain
    ``host:port`` (the sidecar's services): ``dials`` replaces the upstreams' dial addresses
    (``unix//path``), ``upstream_tls`` fills an https transport's ``tls`` (``server_name``,
    ``insecure_skip_verify``), ``request_headers`` are set on the way up after ``Host`` (and may
    replace it). Raises :class:`~common.problems.ConfigError` for an empty list or mixed
    transports (Caddy puts one transport on a handler; :func:`caddy.model.transport_groups`
    splits such lists).
    """
    problems: list[Problem] = []
    if not upstreams:
        problems.append(Problem("upstreams", "at least one upstream is required"))
    elif len({u.transport_key for u in upstreams}) > 1:
        problems.append(
            Problem(
                "upstreams",
                "all upstreams of one reverse_proxy need the same scheme and tailnet node; got "
                + ", ".join(
                    f"{u.url}{' via ' + u.tailnet_node if u.tailnet_node else ''}" for u in upstreams
                ),
            )
        )
    raise_if(problems)
    handler: dict[str, Any] = {
        "handler": "reverse_proxy",
        "upstreams": [{"dial": d} for d in (dials if dials is not None else [u.dial for u in upstreams])],
        "load_balancing": load_balancing(policy, upstreams, fallback_follows=fallback_follows),
    }
    checks = health_checks(policy)
    if checks:
        handler["health_checks"] = checks
    headers = {"Host": [UPSTREAM_HOST_PLACEHOLDER]}
    headers.update({name: [value] for name, value in (request_headers or {}).items()})
    transport = _transport(policy, upstreams)
    if "tls" in transport and upstream_tls:
        transport["tls"] = dict(upstream_tls)
    handler.update(
        {
            "flush_interval": -1,
            "headers": {"request": {"set": headers}},
            "transport": transport,
        }
    )
    return handler


def health_checks(policy: Policy) -> dict[str, Any]:
    """The ``health_checks`` value: ``active`` and/or ``passive`` as the policy says (may be empty)."""
    checks: dict[str, Any] = {}
    if policy.active_health_checks:
        checks["active"] = {
            "uri": policy.health_path,
            "interval": _ns(policy.health_interval_s),
            "timeout": _ns(policy.health_timeout_s),
            "expect_status": 200,
        }
    if policy.passive_health_checks:
        checks["passive"] = {
            "fail_duration": _ns(policy.fail_duration_s),
            "max_fails": policy.max_fails,
            "unhealthy_status": list(UNHEALTHY_STATUSES),
        }
    return checks


def not_found_handler() -> dict[str, Any]:
    return {
        "handler": "static_response",
        "status_code": 404,
        "headers": {"Content-Type": [PLAIN_TEXT]},
        "body": NOT_FOUND_BODY,
    }


def method_not_allowed_handler() -> dict[str, Any]:
    return {
        "handler": "static_response",
        "status_code": 405,
        "headers": {"Allow": [", ".join(READ_METHODS)], "Content-Type": [PLAIN_TEXT]},
        "body": METHOD_NOT_ALLOWED_BODY,
    }


def server_logs(policy: Policy) -> dict[str, Any] | None:
    """The value of a Caddy HTTP server's ``"logs"`` key (access logs on), or ``None``."""
    return {} if policy.access_log else None


# ---------------------------------------------------------------------------------------------
# The proxy chain: one order for every frontend


class Step(Enum):
    """The steps of the proxy chain, in the order every frontend runs them."""

    STRIP_IDENTITY = "delete every incoming identity header"
    AFTER_STRIP = "the frontend's own identity headers (the sidecar's)"
    PUSH = "under /push: the callers allowed, its own body limit and 413, the proxy"
    BODY_LIMIT = "request_body max_size"
    TOO_LARGE = "413 at once for a Content-Length over the limit"
    PROXY = "exposed paths and methods: small text compressed, then the reverse proxy"
    METHOD_NOT_ALLOWED = "405 for another method on an exposed path"
    NOT_FOUND = "404 for any other path"


def chain_steps(policy: Policy, *, strip_identity: bool | None = None) -> tuple[Step, ...]:
    """The steps this policy has, in order (push ahead of the general body limit, which must
    not cut NAR uploads). :func:`server_routes` renders them as Caddy JSON and
    :func:`caddy.caddyfile.render_snippet` as Caddyfile directives, so both frontends run one chain.

    ``strip_identity``: ``None`` follows the policy; the sidecar passes ``False`` because it
    strips before its own authentication, ahead of the chain.
    """
    steps: list[Step] = []
    if policy.strip_identity_headers if strip_identity is None else strip_identity:
        steps.append(Step.STRIP_IDENTITY)
    steps.append(Step.AFTER_STRIP)
    if policy.expose_push:
        steps.append(Step.PUSH)
    if policy.max_request_body_bytes is not None:
        steps += [Step.BODY_LIMIT, Step.TOO_LARGE]
    steps.append(Step.PROXY)
    paths = path_matcher(policy) is not None
    if method_matcher(policy) is not None:
        steps.append(Step.METHOD_NOT_ALLOWED)
    if paths:
        steps.append(Step.NOT_FOUND)
    return tuple(steps)


def regex_escape(text: str) -> str:
    """Escape for Go's RE2: a backslash before every punctuation character RE2 treats specially."""
    return "".join("\\" + c if c in r"\.+*?()|[]{}^$" else c for c in text)


def server_routes(
    policy: Policy,
    upstreams: Sequence[ProxyTarget],
    *,
    after_strip: Sequence[Mapping[str, Any]] = (),
    strip_identity: bool | None = None,
    prefixes: Sequence[str] | None = None,
    strip_prefix: bool = False,
    base_path: str = "",
    dials: Sequence[str] | None = None,
    upstream_tls: Mapping[str, Any] | None = None,
    request_headers: Mapping[str, str] | None = None,
    push_callers: Sequence[Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The ``routes`` list of one Caddy HTTP server proxying to ``upstreams``: :func:`chain_steps`
    as JSON. The gateway's form of it is checked against the adapted Caddyfile; the sidecar ships
    it as each service's ``proxy`` route.

    Hooks for the sidecar (tsnsrv's options): ``after_strip`` handlers right after the strip
    (identity headers); ``prefixes`` (``None``: every path) serves only paths under one of them,
    404 elsewhere, with ``strip_prefix`` removing the prefix before the chain sees the path;
    ``base_path`` is prepended to the path on the way up, after the path checks (they see the
    path as the client sent it); ``dials``, ``upstream_tls`` and ``request_headers`` go to
    :func:`reverse_proxy_handler`; ``push_callers`` (matcher sets, ``None``: every caller) are
    the callers allowed to push, everyone else gets 403 under ``/push``.
    """
    steps = chain_steps(policy, strip_identity=strip_identity)
    head: list[dict[str, Any]] = []
    if Step.STRIP_IDENTITY in steps:
        head.append({"handle": [identity_strip_handler()]})
    head.extend({"handle": [dict(h)]} for h in after_strip)
    proxy = reverse_proxy_handler(
        policy, upstreams, dials=dials, upstream_tls=upstream_tls, request_headers=request_headers
    )
    chain = _chain_routes(policy, steps, proxy, base_path, push_callers)
    if prefixes is None:
        return head + chain
    return [*head, *_under_prefixes(prefixes, strip_prefix, chain)]


def _chain_routes(
    policy: Policy,
    steps: Sequence[Step],
    proxy: dict[str, Any],
    base_path: str,
    push_callers: Sequence[Mapping[str, Any]] | None,
) -> list[dict[str, Any]]:
    routes: list[dict[str, Any]] = []
    paths = path_matcher(policy)
    up: list[dict[str, Any]] = []
    if base_path:
        up.append({"handler": "rewrite", "uri": base_path + "{http.request.uri}"})
    for step in steps:
        if step is Step.PUSH:
            push: list[dict[str, Any]] = []
            if push_callers is not None:
                not_allowed = {"not": [dict(m) for m in push_callers]}
                push.append({"match": [not_allowed], "handle": [push_forbidden_handler()], "terminal": True})
            body = push_body_handler(policy)
            if body is not None:
                push.append({"handle": [body]})
            too_large = push_too_large_route(policy)
            if too_large is not None:
                push.append(too_large)
            push.append({"handle": [*copy.deepcopy(up), copy.deepcopy(proxy)]})
            routes.append(
                {
                    "match": [push_matcher(policy)],
                    "handle": [
                        {"handler": "subroute", "routes": push, "errors": {"routes": [push_failed_route()]}}
                    ],
                    "terminal": True,
                }
            )
        elif step is Step.BODY_LIMIT:
            body = request_body_handler(policy)
            assert body is not None
            routes.append({"handle": [body]})
        elif step is Step.TOO_LARGE:
            too_large = body_too_large_route(policy)
            assert too_large is not None
            routes.append(too_large)
        elif step is Step.PROXY:
            proxy_routes: list[dict[str, Any]] = []
            encode = encode_handler(policy)
            if encode is not None:
                proxy_routes.append({"match": [small_text_matcher()], "handle": [encode]})
            proxy_routes.append({"handle": [*up, proxy]})
            main: dict[str, Any] = {"handle": [{"handler": "subroute", "routes": proxy_routes}]}
            matcher = public_matcher(policy)
            if matcher is not None:
                main = {"match": [matcher], **main}
            routes.append({**main, "terminal": True})
        elif step is Step.METHOD_NOT_ALLOWED:
            route: dict[str, Any] = {"handle": [method_not_allowed_handler()], "terminal": True}
            routes.append({"match": [paths], **route} if paths is not None else route)
        elif step is Step.NOT_FOUND:
            routes.append({"handle": [not_found_handler()], "terminal": True})
    return routes


def _under_prefixes(
    prefixes: Sequence[str], strip: bool, chain: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    routes: list[dict[str, Any]] = []
    for i, prefix in enumerate(prefixes):
        pattern = "^" + regex_escape(prefix)
        handle: list[dict[str, Any]] = []
        if strip:
            handle.append({"handler": "rewrite", "path_regexp": [{"find": pattern, "replace": ""}]})
        handle.append({"handler": "subroute", "routes": copy.deepcopy(chain)})
        routes.append(
            {
                "match": [{"path_regexp": {"name": f"prefix{i}", "pattern": pattern}}],
                "handle": handle,
                "terminal": True,
            }
        )
    routes.append({"handle": [not_found_handler()], "terminal": True})
    return routes
