"""Shared pytest configuration: every e2e test gets the real tools, or a clear skip reason."""
