"""The small parts of systemd's protocols the cache needs: sd_notify (the bundle's shared one, from
``common.systemd``), the watchdog, LISTEN_FDS."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from common.systemd import notify

__all__ = ["SD_LISTEN_FDS_START", "listen_fds", "notify", "watchdog_interval"]

SD_LISTEN_FDS_START = 3


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between pings (half of WATCHDOG_USEC), when the watchdog is for this process."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2e6


def listen_fds(env: Mapping[str, str] | None = None) -> list[socket.socket]:
    """Sockets passed by socket activation (LISTEN_PID/LISTEN_FDS), else none."""
    env = os.environ if env is None else env
    pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    if not pid or not count or not pid.isdigit() or not count.isdigit() or int(pid) != os.getpid():
        return []
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, True)
        socks.append(socket.socket(fileno=fd))
    return socks
