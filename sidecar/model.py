"""The service model: what a user asks for (``ServiceSpec``) and what may run (``ValidService``).

Pure: no files, sockets or trio here. ``validate`` is the only way to get a ``ValidConfig``, and
only a ``ValidConfig`` reaches the engine, so unvalidated options cannot be run. Every problem is
collected and reported at once, each naming the option it is about.

Options mirror tsnsrv (boinkor-net/tsnsrv); the flag spellings are kebab-case versions of its
camelCase flags, and the config-file keys are their snake_case forms.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from caddy.policy import Policy
from common.problems import ConfigError, Problem

HOSTNAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
TAG_RE = re.compile(r"^tag:[A-Za-z0-9][A-Za-z0-9_-]*$")
LOGIN_RE = re.compile(r"^[^\s,@\"'`{}*\\]+@[^\s,@\"'`{}*\\]+$")
HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
FORBIDDEN_UPSTREAM_HEADER_PREFIXES = ("x-tailscale-", "tailscale-user-")
OAUTH_PREFIX = "tskey-client-"
API_KEY_PREFIX = "tskey-api-"
API_KEY_ENV = "TS_API_KEY"
CREDENTIAL_NAME = "authkey"  # $CREDENTIALS_DIRECTORY/authkey: systemd's LoadCredential=authkey:…
#: What a sidecar process writes besides its nodes' directories: its engine directory (Caddy's
#: homes and admin socket, and the lock saying the process owns it) and its control socket.
#: With a state root of its own (--state-root, state_dir, TS_STATE_DIR, STATE_DIRECTORY: one per
#: systemd instance) they are <root>/_engine and <root>/sidecar.sock; under the default root,
#: which every sidecar a user starts by hand shares, they are <root>/_<instance>/ and
#: <root>/_<instance>/sidecar.sock. "_" cannot start a hostname, so no node directory collides.
ENGINE_DIR_NAME = "_engine"
INSTANCE_DIR_PREFIX = "_"
CONTROL_SOCKET_NAME = "sidecar.sock"
MAX_INSTANCE_LENGTH = 32  # keeps <root>/_<instance>/admin.sock a unix socket path
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with its NUL
#: A service's policy before its ``policy`` overrides: the tailnet policy without health checks.
#: Each service has one upstream, which health checks could only turn into false 503s, and the
#: policy's health path is the cache's, not every service's (``policy = { active_health_checks =
#: true, health_path = "/…" }`` turns them back on).
SERVICE_POLICY = Policy.tailnet(active_health_checks=False, passive_health_checks=False)


class Secret:
    """A secret string (auth key, OAuth client secret) that never shows in reprs or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    @property
    def is_oauth_client_secret(self) -> bool:
        return self._value.startswith(OAUTH_PREFIX)


# --------------------------------------------------------------------------- raw specification


@dataclass
class ServiceSpec:
    """One service as the user wrote it (flags or a config-file table), not yet checked.

    ``None`` means "not given": validation fills in defaults from the environment.
    """

    name: str = ""
    upstream: str | None = None  # http(s) URL
    upstream_unix_addr: str | None = None  # path of a unix socket to dial instead of the URL's host
    ephemeral: bool = False
    tags: list[str] = field(default_factory=list)
    authkey_path: str | None = None
    control_url: str | None = None
    state_dir: str | None = None
    listen_addr: str | None = None
    plaintext: bool = False
    certificate_file: str | None = None
    key_file: str | None = None
    funnel: bool = False
    funnel_only: bool = False
    prefixes: list[str] = field(default_factory=list)
    strip_prefix: bool = True
    upstream_headers: list[str] = field(default_factory=list)
    insecure_https: bool = False
    whois_timeout: float = 1.0
    suppress_whois: bool = False
    read_header_timeout: float | None = None
    timeout: float = 60.0
    policy: dict[str, Any] | None = None  # overrides of caddy.policy.Policy.tailnet() (config file)
    #: callers allowed to use /push: "tag:NAME" (needs the whois directory) or a user's login
    #: name; empty: every caller that reaches the node
    push_allow: list[str] = field(default_factory=list)


@dataclass
class SidecarSpec:
    """The whole sidecar as the user wrote it: shared settings and the services."""

    services: list[ServiceSpec] = field(default_factory=list)
    state_dir: str | None = None  # the sidecar's root; services default to <root>/<name>
    caddy: str | None = None
    prometheus_addr: str | None = None
    health_socket: str | None = None
    tsnet_verbose: bool = False
    #: Tailscale API credentials (a tskey-api- key or a tskey-client- secret) for the whois
    #: directory; else $TS_API_KEY; neither: no directory
    api_key_path: str | None = None
    # problems found while reading flags or a file (unknown keys, wrong types): reported with the rest
    parse_problems: list[Problem] = field(default_factory=list)
    #: what this process is called on disk (its engine directory): the service's name when the
    #: service comes from flags, the config file's name with --config; None: the services' names
    instance: str | None = None


# --------------------------------------------------------------------------- validated form


class TLSMode(Enum):
    TAILSCALE = "tailscale"  # the tailnet's own certificates (*.ts.net), fetched by the node
    CUSTOM = "custom"  # a certificate and key from files
    PLAINTEXT = "plaintext"


class PrefixScope(Enum):
    EITHER = ""
    TAILNET = "tailnet:"
    FUNNEL = "funnel:"


@dataclass(frozen=True)
class Prefix:
    path: str
    scope: PrefixScope

    def applies_on_tailnet(self) -> bool:
        return self.scope is not PrefixScope.FUNNEL

    def __str__(self) -> str:
        return f"{self.scope.value}{self.path}"


@dataclass(frozen=True)
class Upstream:
    """Where requests go: ``dial`` is Caddy's dial address (``host:port`` or ``unix//path``)."""

    url: str
    scheme: str  # "http" or "https"
    dial: str
    server_name: str  # TLS server name for https upstreams
    base_path: str  # the URL's path without a trailing slash, prepended to every request path
    insecure_tls: bool
    host_header: str  # the URL's host[:port]

    @property
    def is_unix(self) -> bool:
        return self.dial.startswith("unix/")

    @property
    def policy_url(self) -> str:
        """``scheme://host[:port]``, as the shared policy's ``Upstream`` takes it."""
        return f"{self.scheme}://{self.host_header}"


@dataclass(frozen=True)
class Listen:
    port: int
    tls: TLSMode
    certificate_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class AuthSource:
    """Where the node's auth key comes from. Read at start, never at validation."""

    path: str | None  # a file holding an auth key or a tskey-client- secret
    env_value: Secret | None  # TS_AUTHKEY when no path is given
    #: ``$CREDENTIALS_DIRECTORY/authkey`` (systemd ``LoadCredential=authkey:…``) when neither a
    #: path nor TS_AUTHKEY is given; read at start if it exists (absent: no key, like none given)
    credential: str | None = None


@dataclass(frozen=True)
class ApiKeySource:
    """Where the whois directory's API credentials come from. Read at start, never at validation."""

    path: str | None  # a file holding a tskey-api- key or a tskey-client- OAuth client secret
    env_value: Secret | None  # $TS_API_KEY when no path is given

    @property
    def option(self) -> str:
        """The option to name in a problem about these credentials."""
        return "api_key_path" if self.path is not None else f"{API_KEY_ENV} (environment)"


def api_credentials_problem(value: str) -> str | None:
    """Why ``value`` cannot be API credentials, without echoing it; None when it looks right."""
    if not value.startswith((API_KEY_PREFIX, OAUTH_PREFIX)):
        return (
            f"must hold a Tailscale API key ({API_KEY_PREFIX}…) or an OAuth client secret "
            f"({OAUTH_PREFIX}…) allowed to read devices; it holds neither"
        )
    return None


@dataclass(frozen=True)
class ValidService:
    name: str
    upstream: Upstream
    node_dir: str
    listen: Listen
    ephemeral: bool
    tags: tuple[str, ...]
    auth: AuthSource
    control_url: str | None
    prefixes: tuple[Prefix, ...]
    strip_prefix: bool
    upstream_headers: tuple[tuple[str, str], ...]
    whois: bool
    whois_timeout: float
    read_header_timeout: float | None
    startup_timeout: float
    policy: Policy
    #: who may use /push (tags and login names); empty: everyone who reaches the node
    push_allow: tuple[str, ...] = ()

    @property
    def tailnet_prefixes(self) -> tuple[Prefix, ...]:
        return tuple(p for p in self.prefixes if p.applies_on_tailnet())


@dataclass(frozen=True)
class ValidConfig:
    """A configuration that passed ``validate``: the only thing the engine accepts."""

    services: tuple[ValidService, ...]
    state_root: str
    #: this process's own directory (``<root>/_engine``, or ``<root>/_<instance>`` under the
    #: shared default root), locked while it runs
    engine_dir: str
    health_socket: str  # the control socket: status, health, metrics, whois
    caddy: str | None
    prometheus_addr: tuple[str, int] | None
    tsnet_verbose: bool
    #: API credentials for the whois directory (node names and tags); None: no directory
    api_key: ApiKeySource | None = None

    @property
    def whois_directory(self) -> bool:
        """Whether the engine asks the sidecar's whois directory about each caller."""
        return self.api_key is not None

    def service(self, name: str) -> ValidService:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)


# --------------------------------------------------------------------------- validation


def explicit_state_root(spec: SidecarSpec, env: Mapping[str, str]) -> bool:
    """Whether the state root was chosen for this process (a flag, the config, the environment)
    rather than being the per-user default every hand-started sidecar shares."""
    return bool(spec.state_dir or env.get("TS_STATE_DIR") or env.get("STATE_DIRECTORY"))


def default_state_root(env: Mapping[str, str]) -> str:
    """TS_STATE_DIR, else systemd's STATE_DIRECTORY (its first entry), else the XDG state home."""
    if env.get("TS_STATE_DIR"):
        return env["TS_STATE_DIR"]
    if env.get("STATE_DIRECTORY"):
        return env["STATE_DIRECTORY"].split(":")[0]
    if env.get("XDG_STATE_HOME"):
        return str(PurePosixPath(env["XDG_STATE_HOME"]) / "harmonia-sidecar")
    home = env.get("HOME") or "/var/lib"
    return str(PurePosixPath(home) / ".local" / "state" / "harmonia-sidecar")


def _abs(path: str, base: str | None) -> str:
    p = PurePosixPath(path)
    if not p.is_absolute() and base is not None:
        p = PurePosixPath(base) / p
    return str(p)


def parse_host_port(value: str) -> tuple[str, int] | None:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` (loopback) → (host, port), else None."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not port_s.isdigit():
        return None
    port = int(port_s)
    if not 0 <= port <= 65535:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return (host or "127.0.0.1", port)


def _validate_upstream(spec: ServiceSpec, key: str, problems: list[Problem]) -> Upstream | None:
    url = spec.upstream
    if url is None:
        if spec.upstream_unix_addr is None:
            problems.append(
                Problem(f"{key}.upstream", "an upstream URL is required (e.g. http://127.0.0.1:5000)")
            )
            return None
        url = "http://localhost"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        problems.append(Problem(f"{key}.upstream", f"not a valid URL {url!r}: {exc}"))
        return None
    ok = True
    if parts.scheme not in ("http", "https"):
        problems.append(
            Problem(
                f"{key}.upstream",
                f"scheme must be http or https, not {parts.scheme or 'missing'!r} "
                f"(in {url!r}); for a unix socket give upstream_unix_addr "
                "(--upstream-unix-addr)",
            )
        )
        ok = False
    if not parts.hostname:
        problems.append(Problem(f"{key}.upstream", f"URL {url!r} has no host"))
        ok = False
    if parts.query or parts.fragment:
        problems.append(Problem(f"{key}.upstream", f"URL {url!r} must not carry a query or fragment"))
        ok = False
    if parts.username or parts.password:
        problems.append(Problem(f"{key}.upstream", "URL must not carry credentials; use upstream_headers"))
        ok = False
    if spec.insecure_https and parts.scheme != "https":
        problems.append(Problem(f"{key}.insecure_https", "only meaningful with an https upstream"))
        ok = False
    if spec.upstream_unix_addr is not None and not spec.upstream_unix_addr.startswith("/"):
        problems.append(
            Problem(
                f"{key}.upstream_unix_addr",
                f"must be an absolute socket path, not {spec.upstream_unix_addr!r}",
            )
        )
        ok = False
    if not ok:
        return None
    host = parts.hostname or ""
    if spec.upstream_unix_addr is not None:
        dial = f"unix/{spec.upstream_unix_addr}"
    else:
        default_port = 443 if parts.scheme == "https" else 80
        shown = f"[{host}]" if ":" in host else host
        dial = f"{shown}:{port if port is not None else default_port}"
    return Upstream(
        url=url,
        scheme=parts.scheme,
        dial=dial,
        server_name=host,
        base_path=parts.path.rstrip("/"),
        insecure_tls=spec.insecure_https,
        host_header=parts.netloc,
    )


def _validate_listen(spec: ServiceSpec, key: str, problems: list[Problem]) -> Listen | None:
    ok = True
    custom = spec.certificate_file is not None or spec.key_file is not None
    if custom and (spec.certificate_file is None or spec.key_file is None):
        problems.append(
            Problem(
                f"{key}.certificate_file", "a custom certificate needs both certificate_file and key_file"
            )
        )
        ok = False
    if custom and spec.plaintext:
        problems.append(
            Problem(f"{key}.plaintext", "cannot serve plaintext with a custom certificate and key")
        )
        ok = False
    default = ":80" if spec.plaintext else ":443"
    addr = spec.listen_addr if spec.listen_addr is not None else default
    host, sep, port_s = addr.rpartition(":")
    port = int(port_s) if sep and port_s.isdigit() else -1
    if not 1 <= port <= 65535:
        problems.append(
            Problem(f"{key}.listen_addr", f"must be ':PORT' with a port from 1 to 65535, not {addr!r}")
        )
        ok = False
    elif host:
        problems.append(
            Problem(
                f"{key}.listen_addr",
                f"the node listens on its own tailnet addresses: give ':{port}', not {addr!r}",
            )
        )
        ok = False
    if not ok:
        return None
    if spec.plaintext:
        return Listen(port=port, tls=TLSMode.PLAINTEXT)
    if custom:
        return Listen(
            port=port, tls=TLSMode.CUSTOM, certificate_file=spec.certificate_file, key_file=spec.key_file
        )
    return Listen(port=port, tls=TLSMode.TAILSCALE)


def _validate_prefixes(spec: ServiceSpec, key: str, problems: list[Problem]) -> tuple[Prefix, ...]:
    out: list[Prefix] = []
    for raw in spec.prefixes:
        scope = PrefixScope.EITHER
        path = raw
        for candidate in (PrefixScope.TAILNET, PrefixScope.FUNNEL):
            if raw.startswith(candidate.value):
                scope, path = candidate, raw[len(candidate.value) :]
        if not path.startswith("/"):
            problems.append(
                Problem(
                    f"{key}.prefix",
                    f"{raw!r}: a prefix is a URL path "
                    "starting with '/' (optionally after 'tailnet:' or 'funnel:')",
                )
            )
            continue
        if any(c in path for c in "?#") or any(ord(c) < 0x21 for c in path):
            problems.append(
                Problem(
                    f"{key}.prefix", f"{raw!r}: no query, fragment, spaces or control characters in a prefix"
                )
            )
            continue
        out.append(Prefix(path=path, scope=scope))
    if out and not any(p.applies_on_tailnet() for p in out) and not spec.funnel:
        problems.append(
            Problem(
                f"{key}.prefix", "only funnel: prefixes were given, so nothing would be served on the tailnet"
            )
        )
    return tuple(out)


def _validate_headers(spec: ServiceSpec, key: str, problems: list[Problem]) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for raw in spec.upstream_headers:
        name, sep, value = raw.partition(": ")
        if not sep or not HEADER_NAME_RE.match(name):
            problems.append(Problem(f"{key}.upstream_header", f"{raw!r}: the format is 'Header-Name: value'"))
            continue
        if name.lower().startswith(FORBIDDEN_UPSTREAM_HEADER_PREFIXES):
            problems.append(
                Problem(
                    f"{key}.upstream_header",
                    f"{name!r}: identity headers are "
                    "set by the sidecar from the caller's tailnet identity only",
                )
            )
            continue
        if any(ord(c) < 0x20 and c != "\t" for c in value):
            problems.append(Problem(f"{key}.upstream_header", f"{name!r}: control characters in the value"))
            continue
        out.append((name, value))
    return tuple(out)


def _validate_push_allow(spec: ServiceSpec, key: str, problems: list[Problem]) -> tuple[str, ...]:
    bad = [p for p in spec.push_allow if not (TAG_RE.match(p) or LOGIN_RE.match(p))]
    if bad:
        problems.append(
            Problem(
                f"{key}.push_allow",
                f"{bad}: each entry is a tag (tag:NAME) or a user's login name (user@domain)",
            )
        )
    if spec.push_allow and spec.suppress_whois:
        problems.append(
            Problem(
                f"{key}.push_allow",
                "needs the caller's identity, which suppress_whois turns off",
            )
        )
    return tuple(dict.fromkeys(spec.push_allow))


def _validate_service(
    spec: ServiceSpec,
    index: int,
    env: Mapping[str, str],
    state_root: str,
    problems: list[Problem],
    base_dir: str | None,
) -> ValidService | None:
    key = spec.name or f"service[{index}]"
    before = len(problems)
    if not spec.name:
        problems.append(Problem(f"{key}.name", "every service needs a name (its node's hostname)"))
    elif not HOSTNAME_RE.match(spec.name):
        problems.append(
            Problem(
                f"{key}.name",
                f"{spec.name!r} is not a valid node hostname "
                "(lowercase letters, digits and '-', at most 63, no leading '-')",
            )
        )
    upstream = _validate_upstream(spec, key, problems)
    listen = _validate_listen(spec, key, problems)
    if spec.funnel or spec.funnel_only:
        flag = "funnel_only" if spec.funnel_only else "funnel"
        problems.append(
            Problem(
                f"{key}.{flag}",
                "Tailscale Funnel is not available with the "
                "caddy-tailscale engine (it cannot open a funnel listener); "
                "publish on the tailnet only, or use tsnsrv for funnel services",
            )
        )
    if spec.funnel_only and not spec.funnel:
        problems.append(Problem(f"{key}.funnel_only", "requires funnel"))
    bad_tags = [t for t in spec.tags if not TAG_RE.match(t)]
    if bad_tags:
        problems.append(Problem(f"{key}.tag", f"tags look like 'tag:name': bad {bad_tags}"))
    if len(set(spec.tags)) != len(spec.tags):
        problems.append(Problem(f"{key}.tag", "a tag is given twice"))
    prefixes = _validate_prefixes(spec, key, problems)
    headers = _validate_headers(spec, key, problems)
    for opt, val in (("whois_timeout", spec.whois_timeout), ("timeout", spec.timeout)):
        if not val > 0:
            problems.append(Problem(f"{key}.{opt}", f"must be a positive duration, not {val!r}"))
    if spec.read_header_timeout is not None and spec.read_header_timeout < 0:
        problems.append(
            Problem(f"{key}.read_header_timeout", f"must not be negative, not {spec.read_header_timeout!r}")
        )
    control_url = spec.control_url if spec.control_url is not None else (env.get("TS_URL") or None)
    if control_url is not None:
        cparts = urlsplit(control_url)
        if cparts.scheme not in ("http", "https") or not cparts.netloc:
            problems.append(Problem(f"{key}.control_url", f"must be an http(s) URL, not {control_url!r}"))
    policy = SERVICE_POLICY
    try:
        policy = Policy.from_mapping(spec.policy or {}, key=f"{key}.policy", base=policy)
    except ConfigError as exc:  # its keys already name the service: "<name>.policy.<setting>"
        problems.extend(exc.problems)
    push_allow = _validate_push_allow(spec, key, problems)
    if push_allow:
        policy = replace(policy, expose_push=True)  # a route of its own under /push, guarded
    env_key = env.get("TS_AUTHKEY") or None
    if (
        spec.authkey_path is None
        and env_key is not None
        and env_key.startswith(OAUTH_PREFIX)
        and not spec.tags
    ):
        problems.append(
            Problem(
                f"{key}.tag",
                "an OAuth client secret (tskey-client-…) in "
                "TS_AUTHKEY can only mint keys for tagged nodes: give --tag",
            )
        )
    credentials_dir = env.get("CREDENTIALS_DIRECTORY") or None
    credential = None
    if spec.authkey_path is None and env_key is None and credentials_dir is not None:
        credential = str(PurePosixPath(credentials_dir) / CREDENTIAL_NAME)
    if len(problems) > before or upstream is None or listen is None:
        return None
    node_dir = (
        _abs(spec.state_dir, base_dir)
        if spec.state_dir is not None
        else str(PurePosixPath(state_root) / spec.name)
    )
    return ValidService(
        name=spec.name,
        upstream=upstream,
        node_dir=node_dir,
        listen=listen,
        ephemeral=spec.ephemeral,
        tags=tuple(spec.tags),
        auth=AuthSource(
            path=_abs(spec.authkey_path, base_dir) if spec.authkey_path else None,
            env_value=Secret(env_key) if env_key else None,
            credential=credential,
        ),
        control_url=control_url,
        prefixes=prefixes,
        strip_prefix=spec.strip_prefix,
        upstream_headers=headers,
        whois=not spec.suppress_whois,
        whois_timeout=spec.whois_timeout,
        read_header_timeout=spec.read_header_timeout,
        startup_timeout=spec.timeout,
        policy=policy,
        push_allow=push_allow,
    )


def instance_name(spec: SidecarSpec) -> str:
    """The process's instance name: given, else its first service's name (``a``, or ``a+2`` with
    two more); bounded in length (a long one keeps its start and gains a hash of the whole)."""
    names = [s.name for s in spec.services if s.name]
    fallback = (names[0] + (f"+{len(names) - 1}" if len(names) > 1 else "")) if names else "sidecar"
    name = spec.instance or fallback
    if len(name) > MAX_INSTANCE_LENGTH:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{name[: MAX_INSTANCE_LENGTH - 9]}-{digest}"
    return name


def _overlaps(a: str, b: str) -> bool:
    pa, pb = PurePosixPath(a), PurePosixPath(b)
    return pa == pb or pa in pb.parents or pb in pa.parents


def validate(spec: SidecarSpec, env: Mapping[str, str], base_dir: str | None = None) -> ValidConfig:
    """Check everything; return a ``ValidConfig`` or raise ``ConfigError`` listing every problem.

    ``env`` supplies TS_URL, TS_AUTHKEY, CREDENTIALS_DIRECTORY, TS_STATE_DIR, STATE_DIRECTORY
    (passed in, so this stays pure); ``base_dir`` resolves relative paths (the config file's folder, or the working dir).
    """
    problems = list(spec.parse_problems)
    state_root = _abs(spec.state_dir, base_dir) if spec.state_dir else default_state_root(env)
    if not PurePosixPath(state_root).is_absolute():
        problems.append(Problem("state_dir", f"must be an absolute path, not {state_root!r}"))
    own_root = explicit_state_root(spec, env)
    process_dir = (
        PurePosixPath(state_root) / ENGINE_DIR_NAME
        if own_root
        else PurePosixPath(state_root) / (INSTANCE_DIR_PREFIX + instance_name(spec))
    )
    engine_dir = str(process_dir)
    if not spec.services and not spec.parse_problems:
        problems.append(Problem("services", "no service to publish"))
    valid: list[ValidService] = []
    for i, s in enumerate(spec.services):
        v = _validate_service(s, i, env, state_root, problems, base_dir)
        if v is not None:
            valid.append(v)
    seen: dict[str, int] = {}
    for s in spec.services:
        seen[s.name] = seen.get(s.name, 0) + 1
    for name, count in seen.items():
        if name and count > 1:
            problems.append(Problem(f"{name}.name", f"{count} services share the name {name!r}"))
    for i, a in enumerate(valid):
        if _overlaps(a.node_dir, engine_dir):
            problems.append(
                Problem(
                    f"{a.name}.state_dir", f"{a.node_dir!r} overlaps the engine's directory {engine_dir!r}"
                )
            )
        for b in valid[i + 1 :]:
            if _overlaps(a.node_dir, b.node_dir):
                problems.append(
                    Problem(
                        f"{b.name}.state_dir",
                        f"{b.node_dir!r} overlaps {a.name}'s {a.node_dir!r}: "
                        "services sharing state would share a node key",
                    )
                )
    prom: tuple[str, int] | None = None
    if spec.prometheus_addr:
        prom = parse_host_port(spec.prometheus_addr)
        if prom is None:
            problems.append(
                Problem("prometheus_addr", f"must be HOST:PORT or :PORT, not {spec.prometheus_addr!r}")
            )
    health = (
        _abs(spec.health_socket, base_dir)
        if spec.health_socket
        else str((PurePosixPath(state_root) if own_root else process_dir) / CONTROL_SOCKET_NAME)
    )
    if len(health.encode()) > MAX_SOCKET_PATH:
        problems.append(Problem("health_socket", f"{health!r} is too long for a unix socket path"))
    if len((engine_dir + "/admin.sock").encode()) > MAX_SOCKET_PATH:
        problems.append(
            Problem(
                "state_dir",
                f"{state_root!r} is too long: the engine's admin "
                f"socket must fit in a unix socket path ({MAX_SOCKET_PATH} bytes)",
            )
        )
    api_key: ApiKeySource | None = None
    if spec.api_key_path is not None:
        if not spec.api_key_path:
            problems.append(Problem("api_key_path", "an empty path"))
        else:
            api_key = ApiKeySource(path=_abs(spec.api_key_path, base_dir), env_value=None)
    elif env.get(API_KEY_ENV):
        why = api_credentials_problem(env[API_KEY_ENV].strip())
        if why is not None:
            problems.append(Problem(f"{API_KEY_ENV} (environment)", why))
        else:
            api_key = ApiKeySource(path=None, env_value=Secret(env[API_KEY_ENV].strip()))
    if api_key is None and spec.api_key_path is None:
        for service in valid:
            tags = [p for p in service.push_allow if p.startswith("tag:")]
            if tags:
                problems.append(
                    Problem(
                        f"{service.name}.push_allow",
                        f"{tags}: a caller's tags are known only through the whois directory; give "
                        f"api_key_path (--api-key-path) or {API_KEY_ENV}, or allow users only "
                        "(without it a tagged caller would never match and always get 403)",
                    )
                )
    if problems:
        raise ConfigError(problems)
    return ValidConfig(
        services=tuple(valid),
        state_root=state_root,
        engine_dir=engine_dir,
        health_socket=health,
        caddy=spec.caddy,
        prometheus_addr=prom,
        tsnet_verbose=spec.tsnet_verbose,
        api_key=api_key,
    )
