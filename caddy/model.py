"""The small model a frontend of the cache is rendered from: upstreams and the gateway site.

Pure data, validated on construction; every problem is reported at once in a
:class:`~common.problems.ConfigError` whose messages name the offending key.

- :class:`Upstream` — one address of the cache (``http://100.64.0.5:5000``,
  ``https://harmonia.tail1234.ts.net``), optionally dialled through a caddy-tailscale node
  (``tailnet_node``: rendered as ``transport tailscale <node>``).
- :class:`GatewaySite` — the public gateway: its site address, the ordered upstreams (the first
  healthy one is used, the next on failure), the :class:`~caddy.policy.Policy`, and the few
  site-level knobs (snippet name, ``tls``, ``bind``, access-log output).

Upstreams that need different transports (``http`` vs ``https``, direct vs through a tailnet node)
cannot share one Caddy ``reverse_proxy``; :func:`transport_groups` splits an ordered list into runs
that can. The gateway renders at most two such groups (a primary and a fallback); see
:mod:`caddy.caddyfile`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from caddy.policy import Policy
from common.problems import ConfigError, Problem, raise_if

__all__ = ["MAX_TRANSPORT_GROUPS", "GatewaySite", "Upstream", "transport_groups"]

_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_NODE_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_SNIPPET_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SITE_FORBIDDEN = re.compile(r"[\s{}\"'`#;]")
_EMAIL = re.compile(r"^[^@\s{}\"'`#]+@[^@\s{}\"'`#]+$")
_LOG_PATH_FORBIDDEN = re.compile(r"[\s{}\"'`#;]")
_DEFAULT_PORTS = {"http": 80, "https": 443}

#: How many transport groups a gateway can fail over across (primary + fallback).
MAX_TRANSPORT_GROUPS = 2


def _host_problem(host: str) -> str | None:
    if not host:
        return "has no host"
    if host.startswith("["):
        if not host.endswith("]"):
            return f"host {host!r} is not a bracketed IPv6 address"
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"host {host!r} is not a valid IPv6 address"
        return None
    try:
        ipaddress.IPv4Address(host)
        return None
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        return f"host {host!r} is not a valid host name or IP address"
    return None


def _upstream_problems(url: str, tailnet_node: str | None) -> list[Problem]:
    problems: list[Problem] = []
    if not isinstance(url, str) or not url:
        return [Problem("url", "must be a non-empty string such as http://127.0.0.1:5000")]
    scheme, _, rest = (url if "://" in url else f"http://{url}").partition("://")
    netloc, _, tail = rest.partition("/")
    for mark in "?#":
        if mark in netloc:
            netloc, _, extra = netloc.partition(mark)
            tail = tail or extra or mark
    if "@" in netloc:
        # never echo the value: it may hold a password
        return [Problem("url", "credentials in an upstream URL are not supported")]
    if scheme.lower() not in _DEFAULT_PORTS:
        problems.append(Problem("url", f"scheme {scheme!r} of {url!r} is not http or https"))
    if tail:
        problems.append(
            Problem("url", f"{url!r} must be scheme://host[:port] without a path, query or fragment")
        )
    hostport = netloc
    host, port_text = hostport, ""
    if hostport.startswith("["):
        end = hostport.find("]")
        host = hostport[: end + 1] if end >= 0 else hostport
        after = hostport[end + 1 :] if end >= 0 else ""
        port_text = after[1:] if after.startswith(":") else ""
        if after and not after.startswith(":"):
            problems.append(Problem("url", f"{url!r} has junk after the IPv6 address"))
    elif ":" in hostport:
        host, _, port_text = hostport.rpartition(":")
    host_problem = _host_problem(host)
    if host_problem:
        problems.append(Problem("url", f"{url!r} {host_problem}"))
    if (port_text or hostport.endswith(":")) and (not port_text.isdigit() or not 0 < int(port_text) < 65536):
        problems.append(Problem("url", f"port {port_text!r} of {url!r} is not in 1..65535"))
    if tailnet_node is not None and (not isinstance(tailnet_node, str) or not _NODE_NAME.match(tailnet_node)):
        problems.append(
            Problem(
                "tailnet_node",
                f"{tailnet_node!r} is not a node name (letters, digits and '-', at most 63 characters)",
            )
        )
    return problems


@dataclass(frozen=True)
class Upstream:
    """One address of the cache, in the order of preference it is listed in.

    ``url`` is normalised to ``scheme://host:port`` (a bare ``host:port`` means ``http``; the port
    defaults to 80 or 443). ``tailnet_node`` dials it through that caddy-tailscale node
    (``transport tailscale <node>``) instead of the host's network stack.
    """

    url: str
    tailnet_node: str | None = None

    def __post_init__(self) -> None:
        problems = _upstream_problems(self.url, self.tailnet_node)
        raise_if(problems)
        text = self.url if "://" in self.url else f"http://{self.url}"
        parts = urlsplit(text)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
        object.__setattr__(self, "url", f"{parts.scheme}://{host.lower()}:{port}")

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0]

    @property
    def dial(self) -> str:
        """``host:port`` as Caddy dials it (the ``upstreams[].dial`` of its JSON)."""
        return self.url.split("://", 1)[1]

    @property
    def host(self) -> str:
        return self.dial.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.dial.rsplit(":", 1)[1])

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def transport_key(self) -> tuple[str, str | None]:
        """Upstreams with equal keys can share one ``reverse_proxy`` (same scheme and transport)."""
        return (self.scheme, self.tailnet_node)

    @classmethod
    def parse_all(
        cls, urls: list[str] | tuple[str, ...], tailnet_node: str | None = None, key: str = "upstreams"
    ) -> tuple[Upstream, ...]:
        """Build several upstreams, reporting the problems of all of them at once."""
        problems: list[Problem] = []
        built: list[Upstream] = []
        if not urls:
            problems.append(Problem(key, "at least one upstream is required"))
        for i, url in enumerate(urls):
            try:
                built.append(cls(url, tailnet_node))
            except ConfigError as exc:
                problems.extend(p.under(f"{key}[{i}]") for p in exc.problems)
        raise_if(problems)
        return tuple(built)


def transport_groups(upstreams: tuple[Upstream, ...] | list[Upstream]) -> list[tuple[Upstream, ...]]:
    """Split ordered upstreams into consecutive runs that share a transport (scheme and node)."""
    groups: list[list[Upstream]] = []
    for upstream in upstreams:
        if groups and groups[-1][0].transport_key == upstream.transport_key:
            groups[-1].append(upstream)
        else:
            groups.append([upstream])
    return [tuple(g) for g in groups]


@dataclass(frozen=True)
class GatewaySite:
    """The public gateway: one Caddy site in front of the cache's upstreams.

    - ``site``: the site address as Caddy reads it (``harmonia.arsfeld.one``,
      ``https://localhost:8443``).
    - ``upstreams``: in order of preference; at most two transport groups (see module doc).
    - ``snippet_name``: the name of the rendered ``(snippet)`` the site block imports.
    - ``tls``: ``None`` (Caddy's automatic HTTPS), ``"internal"`` (Caddy's local CA), or an ACME
      account e-mail address.
    - ``bind``: interface addresses the site listens on (empty: all).
    - ``log_output``: where access logs go: ``None`` (Caddy's default, stderr), ``"stdout"``,
      ``"stderr"``, or an absolute file path.
    """

    site: str
    upstreams: tuple[Upstream, ...]
    policy: Policy = field(default_factory=Policy)
    snippet_name: str = "harmonia_gateway"
    tls: str | None = None
    bind: tuple[str, ...] = ()
    log_output: str | None = None

    def __post_init__(self) -> None:
        problems: list[Problem] = []
        if not isinstance(self.site, str) or not self.site or _SITE_FORBIDDEN.search(self.site):
            problems.append(
                Problem(
                    "site",
                    f"{self.site!r} is not a Caddy site address (no spaces, braces, quotes, '#' or ';')",
                )
            )
        if not isinstance(self.upstreams, tuple) or not all(isinstance(u, Upstream) for u in self.upstreams):
            problems.append(Problem("upstreams", "must be a tuple of Upstream"))
        elif not self.upstreams:
            problems.append(Problem("upstreams", "at least one upstream is required"))
        else:
            groups = transport_groups(self.upstreams)
            if len(groups) > MAX_TRANSPORT_GROUPS:
                described = " then ".join(
                    f"{g[0].scheme}{' via ' + g[0].tailnet_node if g[0].tailnet_node else ''}" for g in groups
                )
                problems.append(
                    Problem(
                        "upstreams",
                        f"{len(groups)} transport groups ({described}); a gateway fails "
                        f"over across at most {MAX_TRANSPORT_GROUPS}: list upstreams with the same "
                        "scheme (and tailnet node) next to each other",
                    )
                )
        if not isinstance(self.policy, Policy):
            problems.append(Problem("policy", "must be a caddy.policy.Policy"))
        if not isinstance(self.snippet_name, str) or not _SNIPPET_NAME.match(self.snippet_name):
            problems.append(
                Problem("snippet_name", f"{self.snippet_name!r} must be 1-64 letters, digits, '_' or '-'")
            )
        if (
            self.tls is not None
            and self.tls != "internal"
            and not (isinstance(self.tls, str) and _EMAIL.match(self.tls))
        ):
            problems.append(Problem("tls", f"{self.tls!r} must be 'internal' or an ACME e-mail address"))
        if not isinstance(self.bind, tuple):
            problems.append(Problem("bind", "must be a tuple of addresses"))
        else:
            for i, address in enumerate(self.bind):
                if not isinstance(address, str) or not address or _SITE_FORBIDDEN.search(address):
                    problems.append(Problem(f"bind[{i}]", f"{address!r} is not an interface address"))
        if self.log_output is not None and (
            not isinstance(self.log_output, str)
            or _LOG_PATH_FORBIDDEN.search(self.log_output)
            or not (self.log_output in ("stdout", "stderr") or self.log_output.startswith("/"))
        ):
            problems.append(
                Problem(
                    "log_output",
                    f"{self.log_output!r} must be 'stdout', 'stderr' or an absolute path without spaces",
                )
            )
        raise_if(problems)
