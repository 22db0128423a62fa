"""Which tailnet addresses each node has, learnt from tsnet's own log and state.

caddy-tailscale offers no status API, and a tsnet node cannot dial its own quad-100 service
(checked: "no route to host"), so status comes from what tsnet logs at debug level:

    netmap: self: [bpK8L] auth=machine-authorized u=tester@example.com [100.64.0.1/32 fd7a:…/128]

The bracketed tag is the node's public key, shortened (``[`` + 5 base64 characters + ``]``).
Every node of the engine logs through one logger, so the tag is matched with the public key
derived from the private node key in the node's own ``tailscaled.state``.

Parsing is pure; :func:`read_node_short_id` is the one function that reads a file.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass

_SELF = re.compile(r"netmap: self: \[([A-Za-z0-9+/]{5})\][^\[\n]*\[([^\]\n]*)\]")


@dataclass(frozen=True)
class SelfNetmap:
    short_id: str
    addresses: tuple[str, ...]


def parse_self_netmap(message: str) -> SelfNetmap | None:
    """The node's own addresses from a tsnet ``netmap: self:`` log message, if it is one."""
    m = _SELF.search(message)
    if m is None:
        return None
    addresses = tuple(part.split("/", 1)[0] for part in m.group(2).split() if part)
    return SelfNetmap(short_id=m.group(1), addresses=addresses)


def short_id_from_private_key(private_hex: str) -> str:
    """``privkey:<hex>`` (or bare hex) → the 5-character tag tsnet logs for the public key."""
    from nacl.public import PrivateKey

    raw = bytes.fromhex(private_hex.removeprefix("privkey:"))
    public = bytes(PrivateKey(raw).public_key)
    return base64.b64encode(public).decode()[:5]


def short_id_from_state(state: dict[str, object]) -> str | None:
    """The short id of the node whose ``tailscaled.state`` (a JSON object) this is."""
    # tsnet's file store keeps every value base64-encoded
    try:
        current = base64.b64decode(str(state["_current-profile"])).decode()
        prefs = json.loads(base64.b64decode(str(state[current])))
        key = prefs["Config"]["PrivateNodeKey"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(key, str) or set(key.removeprefix("privkey:")) == {"0"}:
        return None
    try:
        return short_id_from_private_key(key)
    except ValueError:
        return None


def read_node_short_id(node_dir: str) -> str | None:
    """Read ``<node_dir>/tailscaled.state``; None until the node has registered."""
    try:
        with open(f"{node_dir}/tailscaled.state", encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return short_id_from_state(state) if isinstance(state, dict) else None
