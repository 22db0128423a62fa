"""caddy.binaries without running Caddy: configs `caddy validate` must never be given."""

from __future__ import annotations

from pathlib import Path

import pytest

from caddy.binaries import CaddyError, has_tailscale_transport, validate
from tests.unit.caddy.scenarios import GATEWAYS, rendered_gateways

RENDERED = rendered_gateways()


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_tailscale_transport_is_recognised_in_every_rendered_gateway(name: str) -> None:
    via_tailnet = any(u.tailnet_node for u in GATEWAYS[name].upstreams)
    assert has_tailscale_transport(RENDERED[name]) is via_tailnet


def test_plain_words_are_not_a_tailscale_transport() -> None:
    assert not has_tailscale_transport("# transport tailscale in a comment\n:80 {\n}\n")
    assert not has_tailscale_transport("reverse_proxy x {\n\ttransport http\n}\n")
    assert has_tailscale_transport("reverse_proxy x {\n\ttransport tailscale gw\n}\n")


def test_validate_refuses_a_tailscale_transport_without_running_caddy(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-caddy"  # were Caddy run, this would be an OSError instead
    with pytest.raises(CaddyError, match="panics on a `transport tailscale` upstream"):
        validate(missing, RENDERED["fleet-via-tailnet"])
    with pytest.raises(FileNotFoundError):
        validate(missing, RENDERED["fleet-two-transports"], isolate_network=False)
