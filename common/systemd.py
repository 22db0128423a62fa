"""systemd's notify protocol (``Type=notify``): the one message both long-running programs send.

``READY=1`` once serving, ``STOPPING=1`` on a stop signal, ``WATCHDOG=1`` for the watchdog,
``STATUS=…`` for ``systemctl status``. Without ``$NOTIFY_SOCKET`` (not under systemd) nothing
is sent; a failed send is never an error for the caller (systemd may be gone while stopping).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["notify"]


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` to ``$NOTIFY_SOCKET`` (``@name``: the abstract namespace).

    True when it was sent; False when there is no socket or the send failed.
    """
    env = os.environ if env is None else env
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError:
            return False
    return True
