"""Shared pytest configuration: every e2e test gets the real tools, or a clear skip reason."""

from tests.support.clients import client_dir, host_nix_client, nix_client, trixie_nix_client

# the two real Nix clients, for every test (tests/support/clients.py)
__all__ = ["client_dir", "host_nix_client", "nix_client", "trixie_nix_client"]
