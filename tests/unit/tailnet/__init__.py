"""Unit tests of the local tailnet (tests/tailnet/)."""
