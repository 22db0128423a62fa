"""Compile a ``ValidConfig`` into the engine's configuration: Caddy JSON for caddy-tailscale.

Pure: no sockets, files or trio. The auth keys (read at start, at the I/O edge) come in as
arguments; ``redact=True`` replaces them, for printing.

Per service, one Caddy server listening on ``tailscale/<name>:<port>`` (``tailscale+tls`` for the
tailnet's own certificates), with these routes:

1. delete every incoming ``X-Tailscale-*`` and ``Tailscale-*`` header (no forged identity);
2. with whois: ``authentication`` by the tailscale provider, then the user's identity headers;
   tagged nodes (and callers whose whois fails) make the provider fail with 401, which the error
   routes catch and serve through the same proxy with node identity (the tailnet address) only;
   with the whois directory (API credentials given), each path then asks the sidecar about the
   caller (``GET /whois?addr=…`` on its unix socket, Caddy's forward_auth pattern) and copies
   the ``X-Tailscale-Node*`` answer headers onto the request — after the strip, so they cannot
   be forged; an unknown caller, an error answer or an unreachable sidecar add nothing and the
   request goes on;
3. the named route ``proxy``: the shared proxy chain, ``caddy.policy.server_routes`` — the very
   builder the gateway's routes come from — with the service's hooks (prefix filter with 404
   outside the prefixes, optional strip, base path, unix dial, TLS name, extra headers): body
   limit and its 413 route, small-text compression, ``reverse_proxy`` streaming with
   ``flush_interval: -1``; its own errors answered in place.

Each server's access log goes to a logger of its own (the engine counts requests from it), and
tsnet's debug log to a log of its own (the engine reads node addresses from it; see
``nodestate``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from caddy.model import Upstream as PolicyUpstream
from caddy.policy import identity_strip_handler, push_failed_route, regex_escape, server_routes

from .model import Listen, Secret, TLSMode, ValidConfig, ValidService
from .whois import NODE_HEADERS

JSON = dict[str, Any]

REDACTED = "REDACTED"
TSNET_LOGGER = "tailscale"
IDLE_TIMEOUT_NS = 300 * 10**9  # keep-alive between requests; never a limit on a body
WHOIS_PATH = "/whois"
WHOIS_DIAL_TIMEOUT_NS = 1 * 10**9
#: the sidecar waits at most whois.MISS_WAIT (1.5 s) on a miss; past this the request goes on
WHOIS_RESPONSE_TIMEOUT_NS = 3 * 10**9
WHOIS_ANSWERED_VAR = "sidecar_whois_answered"


@dataclass(frozen=True)
class EngineFiles:
    """Paths the engine uses, decided by the supervisor (all inside the engine directory)."""

    admin_socket: str


def listen_address(service: ValidService) -> str:
    network = "tailscale+tls" if service.listen.tls is TLSMode.TAILSCALE else "tailscale"
    return f"{network}/{service.name}:{service.listen.port}"


def _headers(op: str, values: Mapping[str, str]) -> JSON:
    return {"handler": "headers", "request": {op: {k: [v] for k, v in values.items()}}}


def proxy_routes(service: ValidService) -> list[JSON]:
    """The routes every request of ``service`` ends in: the shared chain (``caddy.policy.
    server_routes``: body limit → 413 → exposed paths → small-text compression → proxy → 405/404),
    fitted to the service by its hooks: tsnsrv's prefixes and strip, the upstream URL's base
    path, a unix-socket dial, the upstream's TLS name, and tsnsrv's extra request headers.

    No identity strip here: the server strips before authentication, then sets the caller's
    identity, and only then invokes this route.
    """
    up = service.upstream
    tls: JSON = {"server_name": up.server_name}
    if up.insecure_tls:
        tls["insecure_skip_verify"] = True
    headers: dict[str, str] = {}
    if up.is_unix:
        headers["Host"] = up.host_header
    headers["X-Real-Ip"] = "{http.request.remote.host}"
    headers["X-Scheme"] = "http" if service.listen.tls is TLSMode.PLAINTEXT else "https"
    headers.update(service.upstream_headers)
    return server_routes(
        service.policy,
        [PolicyUpstream(up.policy_url)],
        strip_identity=False,
        prefixes=[p.path for p in service.tailnet_prefixes] if service.prefixes else None,
        strip_prefix=service.strip_prefix,
        base_path=up.base_path,
        dials=[up.dial],
        upstream_tls=tls,
        request_headers=headers,
        push_callers=push_callers(service.push_allow) if service.push_allow else None,
    )


#: the identity headers a push rule is checked against: set by the engine, after the strip
USER_LOGIN_HEADER = "X-Tailscale-User-LoginName"
NODE_TAGS_HEADER = "X-Tailscale-Node-Tags"


def push_callers(allowed: Sequence[str]) -> list[JSON]:
    """Matcher sets of the callers allowed to push: a user by the login name ``tailscale_auth``
    found (``X-Tailscale-User-LoginName``), a tagged node by a tag in the whois directory's
    ``X-Tailscale-Node-Tags`` (``tag:a, tag:b``). Both headers exist only as the engine set them:
    every client-sent identity header is deleted first."""
    sets: list[JSON] = []
    for i, entry in enumerate(allowed):
        if entry.startswith("tag:"):
            pattern = r"(^|,)\s*" + regex_escape(entry) + r"\s*(,|$)"
            sets.append({"header_regexp": {NODE_TAGS_HEADER: {"name": f"push_tag{i}", "pattern": pattern}}})
        else:
            sets.append({"header": {USER_LOGIN_HEADER: [entry]}})
    return sets


def _proxy_route(service: ValidService) -> JSON:
    """The named route ``proxy``: :func:`proxy_routes`, its own errors answered in place."""
    return _answer_errors([{"handler": "subroute", "routes": proxy_routes(service)}])


def _answer_errors(handle: list[JSON]) -> JSON:
    """Answer the proxy's own errors (upstream down: 502) right where they happen.

    Needed for the tagged-node path: that request is already inside the server's error routes
    (after tailscale_auth's 401), and an error there makes Caddy answer the *first* error, 401,
    which Nix would not retry. Here every caller gets the proxy's real status.
    """
    return {
        "handle": [
            {
                "handler": "subroute",
                "routes": [{"handle": handle}],
                "errors": {
                    "routes": [
                        # a push PUT the upstream did not answer: 424, never a 5xx (Nix <= 2.33.1
                        # re-sends it empty and hangs); the push route has the same of its own
                        push_failed_route(on_push_paths=True),
                        {
                            "handle": [
                                {
                                    "handler": "static_response",
                                    "status_code": "{http.error.status_code}",
                                    "headers": {"Content-Type": ["text/plain; charset=utf-8"]},
                                    "body": "{http.error.status_code} {http.error.status_text}\n",
                                }
                            ]
                        },
                    ]
                },
            }
        ]
    }


def _user_identity() -> JSON:
    """Headers from ``tailscale_auth``'s placeholders (tsnsrv's names, and Tailscale Serve's)."""
    user = "{http.auth.user."
    always = {
        "X-Tailscale-User": user + "id}",
        "X-Tailscale-User-LoginName": user + "tailscale_user}",
        "X-Tailscale-User-DisplayName": user + "tailscale_name}",
        "X-Tailscale-Node-Addr": "{http.request.remote.host}",
        "Tailscale-User-Login": user + "tailscale_user}",
        "Tailscale-User-Name": user + "tailscale_name}",
    }
    split_login = {
        "handler": "map",
        "source": user + "id}",
        "destinations": ["{sidecar_login_localpart}", "{sidecar_login_domain}"],
        "mappings": [{"input_regexp": "^([^@]+)@(.+)$", "outputs": ["${1}", "${2}"]}],
        "defaults": ["", ""],
    }
    return {
        "handler": "subroute",
        "routes": [
            {"handle": [_headers("set", always), split_login]},
            {
                "match": [{"expression": "{sidecar_login_domain} != ''"}],
                "handle": [
                    _headers(
                        "set",
                        {
                            "X-Tailscale-User-LoginName-Localpart": "{sidecar_login_localpart}",
                            "X-Tailscale-User-LoginName-Domain": "{sidecar_login_domain}",
                        },
                    )
                ],
            },
            {
                "match": [{"expression": user + "tailscale_profile_picture} != ''"}],
                "handle": [
                    _headers(
                        "set",
                        {
                            "X-Tailscale-User-ProfilePicURL": user + "tailscale_profile_picture}",
                            "Tailscale-User-Profile-Pic": user + "tailscale_profile_picture}",
                        },
                    )
                ],
            },
        ],
    }


def _node_identity() -> list[JSON]:
    return [
        identity_strip_handler(),
        _headers("set", {"X-Tailscale-Node-Addr": "{http.request.remote.host}"}),
    ]


def canonical_header(name: str) -> str:
    """Go's canonical form of a header name (``X-Tailscale-Node-StableID`` →
    ``X-Tailscale-Node-Stableid``), the key under which Caddy keeps response headers."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def whois_lookup(socket_path: str) -> JSON:
    """Ask the sidecar's whois directory about the caller and copy its node headers (Caddy's
    ``forward_auth`` as ``caddy adapt`` expands it, fitted): a ``reverse_proxy`` to the sidecar's
    unix socket, rewritten to ``GET /whois?addr={http.request.remote.host}``, sending none of
    the client's headers; on 2xx each of ``whois.NODE_HEADERS`` is deleted from the request and
    set from the answer when the answer has it; any other status adds nothing and goes on.

    ``handle_response`` routes run the rest of the chain, so an error from the lookup itself
    (the sidecar unreachable or too slow) is caught by this subroute's error route, which goes
    on to the proxy without node headers; the marker variable keeps that route from serving a
    request a second time for an error raised after the lookup answered.
    """
    answered: JSON = {"handler": "vars", WHOIS_ANSWERED_VAR: "yes"}
    copy: list[JSON] = [{"handle": [answered]}]
    for name in NODE_HEADERS:
        # the placeholder holds the answer's headers by Go's canonical names
        value = "{http.reverse_proxy.header." + canonical_header(name) + "}"
        copy.append({"handle": [{"handler": "headers", "request": {"delete": [name]}}]})
        copy.append(
            {"match": [{"not": [{"vars": {value: [""]}}]}], "handle": [_headers("set", {name: value})]}
        )
    lookup: JSON = {
        "handler": "reverse_proxy",
        "upstreams": [{"dial": f"unix/{socket_path}"}],
        "rewrite": {"method": "GET", "uri": WHOIS_PATH + "?addr={http.request.remote.host}"},
        "headers": {"request": {"delete": ["*"]}},
        "transport": {
            "protocol": "http",
            "dial_timeout": WHOIS_DIAL_TIMEOUT_NS,
            "response_header_timeout": WHOIS_RESPONSE_TIMEOUT_NS,
        },
        "handle_response": [
            {"match": {"status_code": [2]}, "routes": copy},
            {"routes": [{"handle": [answered]}]},
        ],
    }
    not_answered = {"vars": {"{http.vars." + WHOIS_ANSWERED_VAR + "}": [""]}}
    return {
        "handler": "subroute",
        "routes": [{"handle": [lookup]}],
        "errors": {"routes": [{"match": [not_answered], "handle": [{"handler": "invoke", "name": "proxy"}]}]},
    }


def _server(service: ValidService, listen: str, whois_socket: str | None = None) -> JSON:
    # the strip always runs first, whatever the policy says: identity comes only from the engine
    routes: list[JSON] = [{"handle": [identity_strip_handler()]}]
    server: JSON = {
        "listen": [listen],
        "automatic_https": {"disable": True},
        "named_routes": {"proxy": _proxy_route(service)},
        "idle_timeout": IDLE_TIMEOUT_NS,
    }
    if service.read_header_timeout:
        server["read_header_timeout"] = round(service.read_header_timeout * 1e9)
    # always logged: the sidecar counts requests from these entries (its metrics); whether
    # they are also shown follows the policy's access_log (see CaddyEngine)
    server["logs"] = {"default_logger_name": access_logger(service.name)}
    invoke = {"handler": "invoke", "name": "proxy"}
    if service.whois:
        # with the whois directory: node identity from the sidecar, after every strip
        lookup = [whois_lookup(whois_socket)] if whois_socket is not None else []
        routes.append(
            {
                "handle": [
                    {"handler": "authentication", "providers": {"tailscale": {}}},
                    _user_identity(),
                    *lookup,
                    invoke,
                ]
            }
        )
        server["errors"] = {
            "routes": [
                {
                    "match": [{"expression": "{http.error.status_code} == 401"}],
                    "handle": [*_node_identity(), *copy.deepcopy(lookup), invoke],
                }
            ]
        }
    else:
        routes.append({"handle": [invoke]})
    server["routes"] = routes
    if service.listen.tls is TLSMode.CUSTOM:
        server["tls_connection_policies"] = [{"certificate_selection": {"any_tag": [cert_tag(service.name)]}}]
    elif service.listen.tls is TLSMode.TAILSCALE:
        # the tailscale+tls listener does TLS itself (tsnet's certificate, no ALPN): Caddy can
        # only speak HTTP/1.1 on it; saying so spares a misleading "HTTP/2 skipped" warning
        server["protocols"] = ["h1"]
    return server


def access_logger(name: str) -> str:
    return f"sidecar-{name}"


ACCESS_LOG_PREFIX = "http.log.access." + access_logger("")


def cert_tag(name: str) -> str:
    return f"harmonia-sidecar-{name}"


def _node(service: ValidService, auth_key: Secret | None, redact: bool) -> JSON:
    node: JSON = {"hostname": service.name, "state_dir": service.node_dir, "ephemeral": service.ephemeral}
    if service.tags:
        node["tags"] = list(service.tags)
    if service.control_url:
        node["control_url"] = service.control_url
    if auth_key is not None:
        node["auth_key"] = REDACTED if redact else auth_key.reveal()
    return node


def compile_engine_config(
    cfg: ValidConfig,
    files: EngineFiles,
    auth_keys: Mapping[str, Secret | None],
    *,
    redact: bool = False,
    listen_override: Mapping[str, str] | None = None,
) -> JSON:
    """The whole Caddy JSON document for ``cfg``.

    ``listen_override`` (service name → Caddy listen address) replaces the tailnet listener; it
    exists so the very same routes can be exercised on a loopback unix socket by tests.
    """
    servers: JSON = {}
    certificates: list[JSON] = []
    for s in cfg.services:
        listen = (listen_override or {}).get(s.name) or listen_address(s)
        servers[s.name] = _server(s, listen, cfg.health_socket if cfg.whois_directory else None)
        if s.listen.tls is TLSMode.CUSTOM:
            certificates.append(_certificate(s.listen, s.name))
    apps: JSON = {
        "tailscale": {"nodes": {s.name: _node(s, auth_keys.get(s.name), redact) for s in cfg.services}},
        "http": {"servers": servers},
    }
    if certificates:
        apps["tls"] = {"certificates": {"load_files": certificates}}
    return {
        "admin": {"listen": f"unix/{files.admin_socket}", "config": {"persist": False}},
        "logging": {
            "logs": {
                "default": {
                    "level": "INFO",
                    "exclude": [TSNET_LOGGER],
                    "writer": {"output": "stderr"},
                    "encoder": {"format": "json"},
                },
                # tsnet's debug log carries each node's own addresses ("netmap: self: …"): the
                # engine reads them for status and shows the lines only with tsnet_verbose
                "tsnet": {
                    "level": "DEBUG",
                    "include": [TSNET_LOGGER],
                    "writer": {"output": "stderr"},
                    "encoder": {"format": "json"},
                },
            }
        },
        "apps": apps,
    }


def _certificate(listen: Listen, name: str) -> JSON:
    assert listen.certificate_file is not None
    assert listen.key_file is not None
    return {"certificate": listen.certificate_file, "key": listen.key_file, "tags": [cert_tag(name)]}
