"""The engine config compiler: its structure, and the real Caddy accepting what it emits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trustme

from caddy.model import Upstream
from caddy.policy import identity_strip_handler, server_routes
from sidecar.compile import REDACTED, EngineFiles, compile_engine_config
from sidecar.model import Secret, ServiceSpec, SidecarSpec, ValidConfig, validate

from .conftest import caddy_validate

FILES = EngineFiles(admin_socket="/r/_engine/admin.sock")
URL = "http://127.0.0.1:5000"


def cfg_of(*services: ServiceSpec, env: dict[str, str] | None = None) -> ValidConfig:
    return validate(SidecarSpec(services=list(services), state_dir="/r"), env or {})


def handlers(node: Any) -> list[dict[str, Any]]:
    """Every handler object anywhere in a JSON tree."""
    out: list[dict[str, Any]] = []
    if isinstance(node, dict):
        if "handler" in node:
            out.append(node)
        for value in node.values():
            out.extend(handlers(value))
    elif isinstance(node, list):
        for value in node:
            out.extend(handlers(value))
    return out


def shipped_routes(server: dict[str, Any]) -> list[dict[str, Any]]:
    """The routes of a server's named ``proxy`` route, inside its error-answering subroute."""
    (route,) = server["named_routes"]["proxy"]["handle"][0]["routes"]
    (chain,) = route["handle"]
    assert chain["handler"] == "subroute"
    routes: list[dict[str, Any]] = chain["routes"]
    return routes


def test_the_shipped_routes_are_the_gateway_builders() -> None:
    # a service with the public gateway's policy ships the gateway's very chain: the same
    # builder, only the sidecar's transport hooks added and its strip done before auth
    public = {"restrict_paths": True, "allow_upload": False, "max_request_body_bytes": 1024**2}
    cfg = cfg_of(ServiceSpec(name="h", upstream=URL, plaintext=True, policy=public))
    policy = cfg.services[0].policy
    shipped = shipped_routes(compile_engine_config(cfg, FILES, {})["apps"]["http"]["servers"]["h"])
    sidecar_headers = {"X-Real-Ip": "{http.request.remote.host}", "X-Scheme": "http"}
    assert shipped == server_routes(
        policy,
        [Upstream(URL)],
        strip_identity=False,
        dials=["127.0.0.1:5000"],
        upstream_tls={"server_name": "127.0.0.1"},
        request_headers=sidecar_headers,
    )
    gateway = server_routes(policy, [Upstream(URL)])
    assert gateway[0] == {"handle": [identity_strip_handler()]}  # the sidecar strips before auth
    for name in sidecar_headers:
        (proxy,) = [h for h in handlers(shipped) if h["handler"] == "reverse_proxy"]
        del proxy["headers"]["request"]["set"][name]
    assert shipped == gateway[1:]
    statuses = [h["status_code"] for h in handlers(shipped) if h["handler"] == "static_response"]
    assert statuses == [413, 405, 404]


def test_prefixes_and_base_path_are_builder_hooks() -> None:
    cfg = cfg_of(
        ServiceSpec(
            name="h", upstream="https://cache.lan/base", prefixes=["/a", "tailnet:/b"], strip_prefix=False
        )
    )
    service = cfg.services[0]
    shipped = shipped_routes(compile_engine_config(cfg, FILES, {})["apps"]["http"]["servers"]["h"])
    assert shipped == server_routes(
        service.policy,
        [Upstream("https://cache.lan")],
        strip_identity=False,
        prefixes=["/a", "/b"],
        strip_prefix=False,
        base_path="/base",
        dials=["cache.lan:443"],
        upstream_tls={"server_name": "cache.lan"},
        request_headers={"X-Real-Ip": "{http.request.remote.host}", "X-Scheme": "https"},
    )


def test_one_node_per_service_with_its_own_state() -> None:
    cfg = cfg_of(
        ServiceSpec(
            name="harmonia",
            upstream=URL,
            plaintext=True,
            tags=["tag:cache"],
            ephemeral=True,
            control_url="http://10.77.0.1:8080",
        ),
        ServiceSpec(name="echo", upstream="http://127.0.0.1:9000"),
    )
    j = compile_engine_config(cfg, FILES, {"harmonia": Secret("tskey-auth-1"), "echo": None})
    nodes = j["apps"]["tailscale"]["nodes"]
    assert nodes["harmonia"] == {
        "hostname": "harmonia",
        "state_dir": "/r/harmonia",
        "ephemeral": True,
        "tags": ["tag:cache"],
        "control_url": "http://10.77.0.1:8080",
        "auth_key": "tskey-auth-1",
    }
    assert nodes["echo"]["state_dir"] == "/r/echo"
    assert "auth_key" not in nodes["echo"]
    servers = j["apps"]["http"]["servers"]
    assert servers["harmonia"]["listen"] == ["tailscale/harmonia:80"]
    assert servers["echo"]["listen"] == ["tailscale+tls/echo:443"]
    # the node's TLS listener negotiates no ALPN: HTTP/1.1 is all Caddy can serve there
    assert servers["echo"]["protocols"] == ["h1"]
    assert "protocols" not in servers["harmonia"]
    assert j["admin"] == {"listen": "unix//r/_engine/admin.sock", "config": {"persist": False}}


def test_redaction() -> None:
    cfg = cfg_of(ServiceSpec(name="h", upstream=URL))
    j = compile_engine_config(cfg, FILES, {"h": Secret("tskey-auth-SECRET")}, redact=True)
    text = json.dumps(j)
    assert "SECRET" not in text
    assert j["apps"]["tailscale"]["nodes"]["h"]["auth_key"] == REDACTED


def test_identity_headers_are_stripped_first_and_set_after() -> None:
    cfg = cfg_of(ServiceSpec(name="h", upstream=URL))
    server = compile_engine_config(cfg, FILES, {})["apps"]["http"]["servers"]["h"]
    first = server["routes"][0]["handle"][0]
    assert first["handler"] == "headers"
    assert {"X-Tailscale-*", "Tailscale-*"} <= set(first["request"]["delete"])
    auth = server["routes"][1]["handle"]
    assert auth[0] == {"handler": "authentication", "providers": {"tailscale": {}}}
    set_headers: dict[str, Any] = {}
    for h in handlers(auth[1]):
        if h["handler"] == "headers":
            set_headers.update(h["request"]["set"])
    assert set_headers["X-Tailscale-User-LoginName"] == ["{http.auth.user.tailscale_user}"]
    for name in (
        "X-Tailscale-User",
        "X-Tailscale-User-LoginName-Localpart",
        "X-Tailscale-User-LoginName-Domain",
        "X-Tailscale-User-DisplayName",
        "X-Tailscale-User-ProfilePicURL",
        "X-Tailscale-Node-Addr",
    ):
        assert name in set_headers
    assert auth[-1] == {"handler": "invoke", "name": "proxy"}
    # tagged nodes: tailscale_auth answers 401, the error route serves them with node identity
    error_route = server["errors"]["routes"][0]
    assert error_route["match"] == [{"expression": "{http.error.status_code} == 401"}]
    kinds = [h["handler"] for h in error_route["handle"]]
    assert kinds == ["headers", "headers", "invoke"]
    assert error_route["handle"][0]["request"]["delete"] == first["request"]["delete"]


def test_suppress_whois_has_no_authentication() -> None:
    cfg = cfg_of(ServiceSpec(name="h", upstream=URL, suppress_whois=True))
    server = compile_engine_config(cfg, FILES, {})["apps"]["http"]["servers"]["h"]
    assert "errors" not in server
    assert not [h for h in handlers(server) if h["handler"] == "authentication"]
    assert server["routes"][0]["handle"][0]["request"]["delete"]


def test_proxy_streams_with_the_shared_policy() -> None:
    cfg = cfg_of(ServiceSpec(name="h", upstream=URL, upstream_headers=["X-Extra: 1"]))
    server = compile_engine_config(cfg, FILES, {})["apps"]["http"]["servers"]["h"]
    (proxy,) = [h for h in handlers(server) if h["handler"] == "reverse_proxy"]
    assert proxy["flush_interval"] == -1
    assert proxy["upstreams"] == [{"dial": "127.0.0.1:5000"}]
    assert proxy["transport"]["compression"] is False
    assert "read_timeout" not in proxy["transport"]
    assert "write_timeout" not in proxy["transport"]
    assert "health_checks" not in proxy  # one upstream: health checks only make false 503s
    assert proxy["headers"]["request"]["set"]["X-Extra"] == ["1"]
    assert "write_timeout" not in server
    assert "read_timeout" not in server


def test_unix_and_https_upstreams() -> None:
    cfg = cfg_of(
        ServiceSpec(name="u", upstream_unix_addr="/run/cache.sock"),
        ServiceSpec(name="s", upstream="https://cache.lan:8443/base", insecure_https=True),
    )
    servers = compile_engine_config(cfg, FILES, {})["apps"]["http"]["servers"]
    (unix,) = [h for h in handlers(servers["u"]) if h["handler"] == "reverse_proxy"]
    assert unix["upstreams"] == [{"dial": "unix//run/cache.sock"}]
    assert unix["headers"]["request"]["set"]["Host"] == ["localhost"]
    (tls,) = [h for h in handlers(servers["s"]) if h["handler"] == "reverse_proxy"]
    assert tls["transport"]["tls"] == {"server_name": "cache.lan", "insecure_skip_verify": True}
    rewrites = [h for h in handlers(servers["s"]) if h["handler"] == "rewrite"]
    assert {"handler": "rewrite", "uri": "/base{http.request.uri}"} in rewrites


def test_prefixes_become_anchored_regexps_and_404() -> None:
    cfg = cfg_of(ServiceSpec(name="h", upstream=URL, prefixes=["/a.b", "tailnet:/c", "funnel:/f"]))
    server = compile_engine_config(cfg, FILES, {})["apps"]["http"]["servers"]["h"]
    routes = shipped_routes(server)
    patterns = [r["match"][0]["path_regexp"]["pattern"] for r in routes if "match" in r]
    assert patterns == [r"^/a\.b", "^/c"]  # funnel: prefixes never match on the tailnet
    assert routes[-1]["handle"][0]["status_code"] == 404


def test_listen_override() -> None:
    cfg = cfg_of(ServiceSpec(name="h", upstream=URL))
    j = compile_engine_config(cfg, FILES, {}, listen_override={"h": "unix//tmp/h.sock"})
    assert j["apps"]["http"]["servers"]["h"]["listen"] == ["unix//tmp/h.sock"]


VARIANTS: dict[str, list[ServiceSpec]] = {
    "plaintext": [ServiceSpec(name="harmonia", upstream=URL, plaintext=True)],
    "tailnet-certificates": [ServiceSpec(name="harmonia", upstream=URL)],
    "everything": [
        ServiceSpec(
            name="harmonia",
            upstream="https://cache.lan:8443/base",
            insecure_https=True,
            plaintext=True,
            listen_addr=":8080",
            prefixes=["/nix", "tailnet:/a.b", "funnel:/x"],
            strip_prefix=False,
            upstream_headers=["X-A: b"],
            tags=["tag:cache"],
            ephemeral=True,
            read_header_timeout=5,
            control_url="http://10.77.0.1:8080",
        )
    ],
    "unix-no-whois": [
        ServiceSpec(name="h", upstream_unix_addr="/run/h.sock", suppress_whois=True, plaintext=True)
    ],
    "public-policy": [
        ServiceSpec(
            name="h",
            upstream=URL,
            plaintext=True,
            policy={"restrict_paths": True, "allow_upload": False, "max_request_body_bytes": 1024},
        )
    ],
    "many": [
        ServiceSpec(name=f"s{i}", upstream=f"http://127.0.0.1:{5000 + i}", plaintext=True) for i in range(4)
    ],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_real_caddy_validates_the_compiled_config(caddy_bin: str, tmp_path: Path, variant: str) -> None:
    cfg = cfg_of(*VARIANTS[variant], env={"TS_URL": "http://10.77.0.1:8080"})
    config = compile_engine_config(cfg, FILES, {s.name: Secret("tskey-auth-x") for s in cfg.services})
    result = caddy_validate(caddy_bin, config, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Valid configuration" in result.stdout
    assert not list(tmp_path.glob("**/tailscaled.state"))  # validation starts no node


def test_real_caddy_validates_custom_certificates(caddy_bin: str, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("harmonia.example.ts.net")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cfg = cfg_of(
        ServiceSpec(
            name="harmonia",
            upstream=URL,
            certificate_file=str(tmp_path / "cert.pem"),
            key_file=str(tmp_path / "key.pem"),
        )
    )
    config = compile_engine_config(cfg, FILES, {})
    server = config["apps"]["http"]["servers"]["harmonia"]
    assert server["listen"] == ["tailscale/harmonia:443"]
    assert server["tls_connection_policies"][0]["certificate_selection"]["any_tag"]
    result = caddy_validate(caddy_bin, config, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_real_caddy_rejects_a_broken_config(caddy_bin: str, tmp_path: Path) -> None:
    """The check above can fail: a config Caddy does not understand is refused."""
    cfg = cfg_of(ServiceSpec(name="h", upstream=URL))
    config = compile_engine_config(cfg, FILES, {})
    config["apps"]["http"]["servers"]["h"]["routes"][0]["handle"][0]["handler"] = "nonexistent"
    result = caddy_validate(caddy_bin, config, tmp_path)
    assert result.returncode != 0


def test_health_checks_only_when_the_service_policy_asks() -> None:
    cfg = cfg_of(
        ServiceSpec(name="h", upstream=URL, policy={"active_health_checks": True, "health_path": "/healthz"})
    )
    server = compile_engine_config(cfg, FILES, {})["apps"]["http"]["servers"]["h"]
    (proxy,) = [h for h in handlers(server) if h["handler"] == "reverse_proxy"]
    assert proxy["health_checks"]["active"]["uri"] == "/healthz"
    assert "passive" not in proxy["health_checks"]


def test_body_limit_route_is_the_policy_fragment() -> None:
    from caddy.policy import body_too_large_route

    limited = cfg_of(ServiceSpec(name="h", upstream=URL, policy={"max_request_body_bytes": 10}))
    server = compile_engine_config(limited, FILES, {})["apps"]["http"]["servers"]["h"]
    chain = shipped_routes(server)
    assert chain[0] == {"handle": [{"handler": "request_body", "max_size": 10}]}
    assert chain[1] == body_too_large_route(limited.services[0].policy)
    unlimited = cfg_of(ServiceSpec(name="h", upstream=URL, policy={"max_request_body_bytes": None}))
    server = compile_engine_config(unlimited, FILES, {})["apps"]["http"]["servers"]["h"]
    assert not [
        h
        for h in handlers(server)
        if h["handler"] in ("request_body", "static_response") and h.get("status_code") in (None, 413)
    ]


def test_push_allow_becomes_the_builders_push_guard() -> None:
    from caddy.policy import push_matcher
    from sidecar.compile import push_callers

    cfg = cfg_of(
        ServiceSpec(name="h", upstream=URL, push_allow=["tag:ci", "ci@example.com"]),
        env={"TS_API_KEY": "tskey-api-k1-x"},
    )
    routes = shipped_routes(compile_engine_config(cfg, FILES, {})["apps"]["http"]["servers"]["h"])
    push = routes[0]
    assert push["match"] == [push_matcher(cfg.services[0].policy)]
    guard = push["handle"][0]["routes"][0]
    assert guard["match"] == [{"not": push_callers(["tag:ci", "ci@example.com"])}]
    assert guard["handle"][0]["status_code"] == 403
    assert push_callers(["tag:ci", "ci@example.com"]) == [
        {
            "header_regexp": {
                "X-Tailscale-Node-Tags": {"name": "push_tag0", "pattern": r"(^|,)\s*tag:ci\s*(,|$)"}
            }
        },
        {"header": {"X-Tailscale-User-LoginName": ["ci@example.com"]}},
    ]
    # the rest of the chain is the service's as before
    assert routes[1:] == shipped_routes(
        compile_engine_config(cfg_of(ServiceSpec(name="h", upstream=URL)), FILES, {})["apps"]["http"][
            "servers"
        ]["h"]
    )


def test_real_caddy_validates_a_push_guard(caddy_bin: str, tmp_path: Path) -> None:
    cfg = cfg_of(
        ServiceSpec(name="h", upstream=URL, push_allow=["tag:ci", "u@example.com"]),
        env={"TS_API_KEY": "tskey-api-k1-x"},
    )
    result = caddy_validate(
        caddy_bin, compile_engine_config(cfg, FILES, {"h": Secret("tskey-auth-x")}), tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Valid configuration" in result.stdout
