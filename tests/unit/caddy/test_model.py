"""caddy.model: upstream addresses, transport groups, the gateway site."""

from __future__ import annotations

import pytest

from caddy.model import GatewaySite, Upstream, transport_groups
from caddy.policy import Policy
from common.problems import ConfigError


@pytest.mark.parametrize(
    ("given", "url", "dial", "tls"),
    [
        ("127.0.0.1:5000", "http://127.0.0.1:5000", "127.0.0.1:5000", False),
        ("http://raider:5000", "http://raider:5000", "raider:5000", False),
        ("http://raider", "http://raider:80", "raider:80", False),
        (
            "https://harmonia.tail1234.ts.net",
            "https://harmonia.tail1234.ts.net:443",
            "harmonia.tail1234.ts.net:443",
            True,
        ),
        (
            "https://Harmonia.Tail1234.ts.net/",
            "https://harmonia.tail1234.ts.net:443",
            "harmonia.tail1234.ts.net:443",
            True,
        ),
        ("http://[::1]:5001", "http://[::1]:5001", "[::1]:5001", False),
        ("http://100.64.0.5:5000", "http://100.64.0.5:5000", "100.64.0.5:5000", False),
    ],
)
def test_upstream_normalisation(given: str, url: str, dial: str, tls: bool) -> None:
    upstream = Upstream(given)
    assert (upstream.url, upstream.dial, upstream.tls) == (url, dial, tls)
    assert upstream.port == int(dial.rsplit(":", 1)[1])


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ("", "non-empty"),
        ("ftp://host", "scheme 'ftp'"),
        ("http://host/path", "without a path"),
        ("http://host?x=1", "without a path"),
        ("http://host:0", "not in 1..65535"),
        ("http://host:99999", "not in 1..65535"),
        ("http://host:", "not in 1..65535"),
        ("http://-bad-.example", "not a valid host name"),
        ("http://[::zz]:1", "not a valid IPv6"),
        ("http://a b:1", "not a valid host name"),
    ],
)
def test_bad_upstreams_are_refused(given: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        Upstream(given)


def test_credentials_in_an_upstream_are_refused_without_echoing_them() -> None:
    with pytest.raises(ConfigError) as caught:
        Upstream("http://user:s3cret@host:5000")
    assert "s3cret" not in str(caught.value)
    assert "credentials" in str(caught.value)


def test_bad_node_name() -> None:
    with pytest.raises(ConfigError, match="tailnet_node"):
        Upstream("http://h:1", "bad node")


def test_parse_all_reports_every_upstream() -> None:
    with pytest.raises(ConfigError) as caught:
        Upstream.parse_all(["ftp://a", "http://ok:1", "http://b:0"])
    assert [p.key.split(".", 1)[0] for p in caught.value.problems] == ["upstreams[0]", "upstreams[2]"]
    with pytest.raises(ConfigError, match="at least one"):
        Upstream.parse_all([])


def test_transport_groups_keep_order() -> None:
    ups = [
        Upstream("https://a.example"),
        Upstream("https://b.example"),
        Upstream("http://c:1"),
        Upstream("http://d:1", "gw"),
    ]
    groups = transport_groups(ups)
    assert [[u.dial for u in g] for g in groups] == [
        ["a.example:443", "b.example:443"],
        ["c:1"],
        ["d:1"],
    ]


def test_gateway_site_limits_transport_groups() -> None:
    three = (Upstream("https://a.example"), Upstream("http://c:1"), Upstream("https://b.example"))
    with pytest.raises(ConfigError, match="3 transport groups"):
        GatewaySite("harmonia.arsfeld.one", three)
    GatewaySite("harmonia.arsfeld.one", three[:2])


def test_gateway_site_reports_every_problem() -> None:
    with pytest.raises(ConfigError) as caught:
        GatewaySite(
            "bad site {",
            (),
            policy="public",  # type: ignore[arg-type]
            snippet_name="no spaces",
            tls="maybe",
            bind=("",),
            log_output="relative.log",
        )
    keys = [p.key for p in caught.value.problems]
    assert keys == ["site", "upstreams", "policy", "snippet_name", "tls", "bind[0]", "log_output"]


def test_gateway_site_defaults() -> None:
    site = GatewaySite("harmonia.arsfeld.one", (Upstream("127.0.0.1:5000"),))
    assert site.policy == Policy()
    assert site.snippet_name == "harmonia_gateway"
    assert site.tls is None and site.bind == () and site.log_output is None
