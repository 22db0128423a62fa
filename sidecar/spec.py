"""Reading a ``SidecarSpec`` from command-line flags or from a TOML document.

Pure: the TOML text and the argv list come in, a spec with every parse problem comes out;
``model.validate`` then adds the semantic problems and reports them all together.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import PurePosixPath
from typing import Any, NoReturn

from common.problems import Problem

from .model import ServiceSpec, SidecarSpec

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Go-style durations as tsnsrv takes them (``1s``, ``1m30s``, ``500ms``) or plain seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if m is None:
            raise ValueError(f"not a duration: {text!r} (use e.g. 1s, 1m30s, 500ms, or seconds)")
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if not text:
        raise ValueError("empty duration")
    return total


# --------------------------------------------------------------------------- command line


class ArgvError(Exception):
    """argparse could not read the command line (e.g. a flag without its value)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ArgvError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="harmonia-sidecar",
        description="Publish local HTTP services on a tailnet, each as its own node "
        "(tsnsrv's options; tsnet through caddy-tailscale as the engine).",
        epilog="Other commands: 'harmonia-sidecar status' prints each service's node. "
        "Environment: TS_URL (control URL), TS_AUTHKEY (auth key or tskey-client- "
        "secret; else $CREDENTIALS_DIRECTORY/authkey, systemd's LoadCredential), "
        "TS_STATE_DIR / STATE_DIRECTORY (state root), TS_API_KEY (whois directory "
        "credentials, as --api-key-path).",
        allow_abbrev=False,
    )
    p.add_argument("upstream", nargs="?", help="upstream URL, http:// or https://")
    p.add_argument("--config", metavar="FILE", help="TOML file describing many services")
    p.add_argument("--name", help="the node's hostname on the tailnet")
    p.add_argument(
        "--upstream-unix-addr", metavar="PATH", help="dial this unix socket instead of the URL's host"
    )
    p.add_argument("--ephemeral", action="store_true", default=None)
    p.add_argument("--funnel", action="store_true", default=None)
    p.add_argument("--funnel-only", action="store_true", default=None)
    p.add_argument("--listen-addr", metavar=":PORT", help="default :443 (:80 with --plaintext)")
    p.add_argument("--plaintext", action="store_true", default=None)
    p.add_argument("--certificate-file", metavar="FILE")
    p.add_argument("--key-file", metavar="FILE")
    p.add_argument("--prefix", action="append", metavar="[tailnet:|funnel:]PATH")
    p.add_argument("--strip-prefix", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--state-dir", metavar="DIR", help="the node's own state directory (default <state root>/<name>)"
    )
    p.add_argument(
        "--state-root",
        metavar="DIR",
        help="the sidecar's state root (default $TS_STATE_DIR, $STATE_DIRECTORY)",
    )
    p.add_argument(
        "--authkey-path", metavar="FILE", help="file holding an auth key or a tskey-client- OAuth secret"
    )
    p.add_argument(
        "--api-key-path",
        metavar="FILE",
        help="Tailscale API key (tskey-api-) or OAuth client secret (tskey-client-) "
        "file: turns on the whois directory (node names and tags for the "
        "upstream); default $TS_API_KEY",
    )
    p.add_argument("--control-url", metavar="URL", help="default $TS_URL")
    p.add_argument("--tag", action="append", metavar="tag:NAME")
    p.add_argument("--insecure-https", action="store_true", default=None)
    p.add_argument("--whois-timeout", metavar="DURATION")
    p.add_argument("--suppress-whois", action="store_true", default=None)
    p.add_argument("--read-header-timeout", metavar="DURATION")
    p.add_argument("--timeout", metavar="DURATION", help="start-up timeout (default 1m)")
    p.add_argument("--upstream-header", action="append", metavar="'Name: value'")
    p.add_argument(
        "--push-allow",
        action="append",
        metavar="tag:NAME,LOGIN",
        help="only these callers may use /push (the cache's uploads): tags (need the whois "
        "directory, --api-key-path) and users' login names, comma-separated or repeated; "
        "default: every caller that reaches the node",
    )
    p.add_argument(
        "--prometheus-addr",
        metavar="HOST:PORT",
        help="serve /metrics and /health here (':PORT' means loopback)",
    )
    p.add_argument(
        "--health-socket",
        metavar="PATH",
        help="unix socket for status, health and metrics (default <root>/sidecar.sock; under the "
        "default root <root>/_<instance>/sidecar.sock)",
    )
    p.add_argument("--caddy", metavar="PATH", help="the Caddy binary with caddy-tailscale")
    p.add_argument("--tsnet-verbose", action="store_true", default=None)
    p.add_argument(
        "--print-engine-config",
        action="store_true",
        help="validate, print the engine's JSON config (secrets redacted) and exit",
    )
    return p


SERVICE_FLAGS = (
    "name",
    "upstream",
    "upstream_unix_addr",
    "ephemeral",
    "funnel",
    "funnel_only",
    "listen_addr",
    "plaintext",
    "certificate_file",
    "key_file",
    "prefix",
    "strip_prefix",
    "state_dir",
    "authkey_path",
    "control_url",
    "tag",
    "insecure_https",
    "whois_timeout",
    "suppress_whois",
    "read_header_timeout",
    "timeout",
    "upstream_header",
    "push_allow",
)


def _set_duration(target: Any, attr: str, text: str | None, key: str, problems: list[Problem]) -> None:
    if text is None:
        return
    try:
        setattr(target, attr, parse_duration(text))
    except ValueError as exc:
        problems.append(Problem(key, str(exc)))


def usage() -> str:
    return _parser().format_help()


def config_instance(path: str) -> str:
    """A config file's name as the instance name of the process it runs (``/etc/x/cache.toml`` →
    ``cache``): one process per config file, so two config files need two names."""
    stem = PurePosixPath(path).name.removesuffix(".toml") or "config"
    return re.sub(r"[^A-Za-z0-9._-]", "-", stem)


class ArgvResult:
    def __init__(self, spec: SidecarSpec, config_file: str | None, print_config: bool) -> None:
        self.spec = spec
        self.config_file = config_file
        self.print_config = print_config


def spec_from_argv(
    argv: Sequence[str], read_config: Callable[[str], tuple[str, SidecarSpec]] | None = None
) -> ArgvResult:
    """Flags → spec. Unknown flags and unparsable values become problems, not early exits.

    With ``--config FILE``, ``read_config(FILE)`` supplies the services (the caller does the I/O);
    only the sidecar-wide flags may then be given on the command line.
    """
    parser = _parser()
    try:
        ns, unknown = parser.parse_known_args(list(argv))
    except ArgvError as exc:
        flag = re.match(r"argument (\S+?)(?:/\S+)?:", str(exc))
        return ArgvResult(
            SidecarSpec(parse_problems=[Problem(flag.group(1) if flag else "command line", str(exc))]),
            None,
            False,
        )
    problems: list[Problem] = []
    for u in unknown:
        problems.append(
            Problem(
                u.split("=", 1)[0] if u.startswith("-") else "upstream URL",
                f"unknown option {u!r}" if u.startswith("-") else f"unexpected argument {u!r}",
            )
        )
    if ns.config is not None:
        given = [f for f in SERVICE_FLAGS if getattr(ns, f) is not None]
        for f in given:
            problems.append(
                Problem(
                    "--" + f.replace("_", "-"),
                    "service options go in the --config file, not on the command line",
                )
            )
        spec = SidecarSpec()
        if read_config is not None:
            _, spec = read_config(ns.config)
        spec.parse_problems[:0] = problems
        spec.instance = config_instance(ns.config)
    else:
        svc = ServiceSpec(
            name=ns.name or "",
            upstream=ns.upstream,
            upstream_unix_addr=ns.upstream_unix_addr,
            ephemeral=bool(ns.ephemeral),
            funnel=bool(ns.funnel),
            funnel_only=bool(ns.funnel_only),
            listen_addr=ns.listen_addr,
            plaintext=bool(ns.plaintext),
            certificate_file=ns.certificate_file,
            key_file=ns.key_file,
            prefixes=list(ns.prefix or []),
            strip_prefix=ns.strip_prefix if ns.strip_prefix is not None else True,
            state_dir=ns.state_dir,
            authkey_path=ns.authkey_path,
            control_url=ns.control_url,
            tags=list(ns.tag or []),
            insecure_https=bool(ns.insecure_https),
            suppress_whois=bool(ns.suppress_whois),
            upstream_headers=list(ns.upstream_header or []),
            push_allow=[p.strip() for given in ns.push_allow or [] for p in given.split(",") if p.strip()],
        )
        if not ns.name:
            problems.append(Problem("--name", "required: the node's hostname on the tailnet"))
        _set_duration(svc, "whois_timeout", ns.whois_timeout, "--whois-timeout", problems)
        _set_duration(svc, "read_header_timeout", ns.read_header_timeout, "--read-header-timeout", problems)
        _set_duration(svc, "timeout", ns.timeout, "--timeout", problems)
        spec = SidecarSpec(services=[svc], parse_problems=problems, instance=ns.name or None)
    if ns.state_root is not None:
        spec.state_dir = ns.state_root
    for attr in ("caddy", "prometheus_addr", "health_socket", "api_key_path"):
        if getattr(ns, attr) is not None:
            setattr(spec, attr, getattr(ns, attr))
    if ns.tsnet_verbose:
        spec.tsnet_verbose = True
    return ArgvResult(spec, ns.config, bool(ns.print_engine_config))


# --------------------------------------------------------------------------- TOML


_SERVICE_KEYS: dict[str, str] = {f.name: f.name for f in fields(ServiceSpec)}
_SERVICE_KEYS.update({"prefix": "prefixes", "tag": "tags", "upstream_header": "upstream_headers"})
_SERVICE_KEYS.pop("name")
_DURATION_KEYS = {"whois_timeout", "read_header_timeout", "timeout"}
_LIST_KEYS = {"prefixes", "tags", "upstream_headers", "push_allow"}
_TABLE_KEYS = {"policy"}
_BOOL_KEYS = {
    "ephemeral",
    "plaintext",
    "funnel",
    "funnel_only",
    "strip_prefix",
    "insecure_https",
    "suppress_whois",
}
_TOP_KEYS = {
    "state_dir",
    "caddy",
    "prometheus_addr",
    "health_socket",
    "tsnet_verbose",
    "api_key_path",
    "services",
    "defaults",
}


def _service_from_table(
    name: str, table: dict[str, Any], defaults: dict[str, Any], problems: list[Problem]
) -> ServiceSpec:
    svc = ServiceSpec(name=name)
    for raw_key, value in {**defaults, **table}.items():
        key = f"{name}.{raw_key}"
        attr = _SERVICE_KEYS.get(raw_key)
        if attr is None:
            problems.append(Problem(key, f"unknown key; known: {', '.join(sorted(_SERVICE_KEYS))}"))
            continue
        if attr in _DURATION_KEYS:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                problems.append(Problem(key, "a duration: seconds or a string like '1m30s'"))
                continue
            try:
                setattr(svc, attr, parse_duration(str(value)))
            except ValueError as exc:
                problems.append(Problem(key, str(exc)))
        elif attr in _LIST_KEYS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                problems.append(Problem(key, "a list of strings"))
                continue
            setattr(svc, attr, list(value))
        elif attr in _TABLE_KEYS:
            if not isinstance(value, dict):
                problems.append(Problem(key, "a table of caddy.policy.Policy settings"))
                continue
            setattr(svc, attr, dict(value))
        elif attr in _BOOL_KEYS:
            if not isinstance(value, bool):
                problems.append(Problem(key, "true or false"))
                continue
            setattr(svc, attr, value)
        else:
            if not isinstance(value, str):
                problems.append(Problem(key, "a string"))
                continue
            setattr(svc, attr, value)
    return svc


def spec_from_toml(text: str, origin: str = "config") -> SidecarSpec:
    """A TOML document → spec. Layout::

    state_dir = "/var/lib/harmonia-sidecar"   # optional; the state root
    [defaults]                                 # optional; any service key, for every service
    tags = ["tag:cache"]
    [services.harmonia]                        # the table's name is the node's hostname
    upstream = "http://127.0.0.1:5000"
    plaintext = true
    """
    problems: list[Problem] = []
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return SidecarSpec(parse_problems=[Problem(origin, f"not valid TOML: {exc}")])
    spec = SidecarSpec()
    for key in doc:
        if key not in _TOP_KEYS:
            problems.append(Problem(key, f"unknown top-level key; known: {', '.join(sorted(_TOP_KEYS))}"))
    for key in ("state_dir", "caddy", "prometheus_addr", "health_socket", "api_key_path"):
        if key in doc:
            if isinstance(doc[key], str):
                setattr(spec, key, doc[key])
            else:
                problems.append(Problem(key, "a string"))
    if "tsnet_verbose" in doc:
        if isinstance(doc["tsnet_verbose"], bool):
            spec.tsnet_verbose = doc["tsnet_verbose"]
        else:
            problems.append(Problem("tsnet_verbose", "true or false"))
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        problems.append(Problem("defaults", "a table of service keys"))
        defaults = {}
    services = doc.get("services", {})
    if not isinstance(services, dict):
        problems.append(Problem("services", "tables named after each node: [services.NAME]"))
        services = {}
    for name, table in services.items():
        if not isinstance(table, dict):
            problems.append(Problem(f"services.{name}", "a table"))
            continue
        spec.services.append(_service_from_table(name, table, defaults, problems))
    spec.parse_problems = problems
    return spec
