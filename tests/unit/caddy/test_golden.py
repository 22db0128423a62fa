"""Golden-file tests of every renderer (HARMONIA_UPDATE_GOLDEN=1 rewrites the files)."""

from __future__ import annotations

import pytest

from tests.unit.caddy.golden import GOLDEN_DIR, check_golden
from tests.unit.caddy.scenarios import ROUTES, rendered_client, rendered_gateways

GATEWAYS = rendered_gateways()
CLIENT = rendered_client()


@pytest.mark.parametrize("name", sorted(GATEWAYS))
def test_gateway_caddyfile_matches_golden(name: str) -> None:
    check_golden(f"{name}.caddyfile", GATEWAYS[name])


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_engine_routes_match_golden(name: str) -> None:
    check_golden(f"{name}.json", ROUTES[name])


@pytest.mark.parametrize("name", sorted(CLIENT))
def test_client_settings_match_golden(name: str) -> None:
    check_golden(name, CLIENT[name])


def test_every_golden_file_is_still_rendered() -> None:
    expected = {f"{n}.caddyfile" for n in GATEWAYS} | {f"{n}.json" for n in ROUTES} | set(CLIENT)
    on_disk = {p.name for p in GOLDEN_DIR.iterdir() if p.is_file()}
    assert on_disk == expected, "stale or missing golden files"
