"""Fixtures shared by every end-to-end test: the real Nix daemon and the store fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fixtures import Fixtures, build_fixtures
from tests.support.nix import have_nix, running_daemon


@pytest.fixture(scope="session")
def nix_daemon_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    if not have_nix():
        pytest.skip("Nix is not installed (the README's test command installs Debian's nix-bin)")
    with running_daemon(tmp_path_factory.mktemp("nix-daemon")) as env:
        yield env


@pytest.fixture(scope="session")
def store_fixtures(nix_daemon_env: dict[str, str]) -> Fixtures:
    return build_fixtures(nix_daemon_env)


@pytest.fixture
def client_root(tmp_path: Path) -> Path:
    """A fresh store for a Nix client (`--store <root>`), empty."""
    root = tmp_path / "client-store"
    root.mkdir()
    return root
