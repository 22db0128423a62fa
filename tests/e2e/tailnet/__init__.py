"""End-to-end tests of the local tailnet with real Tailscale nodes, in a network namespace."""
