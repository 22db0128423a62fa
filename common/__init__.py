"""What every package of the bundle shares, standard library only: the one configuration error
(:mod:`common.problems`) and systemd's notify protocol (:mod:`common.systemd`).

A leaf: ``common`` imports nothing of the bundle, and ``cache``, ``caddy`` and ``sidecar`` may
all import it (``cache`` still imports neither ``caddy`` nor ``sidecar``).
"""
