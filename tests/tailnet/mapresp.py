"""Building MapResponses, DERP maps and register responses (pure: plain dicts for ``json.dumps``).

What the real clients need, learned the hard way (see docs/tailnet.md): ``PacketFilter`` (else Go drops
traffic), a DERP map (else Go never leaves ``Starting``), ``CollectServices`` as a JSON boolean, and
user profiles for every user a node sees (so WhoIs can name a peer's user).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from . import keys
from .state import Node, Registry

ZERO_TIME = "0001-01-01T00:00:00Z"
DERP_MAGIC_IP = "127.3.3.40"

ALLOW_ALL_FILTER: list[dict[str, Any]] = [
    {"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]},
]


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class DerpNode:
    """Where the relay listens, as the DERP map advertises it."""

    host: str
    port: int
    region_id: int = 900
    region_code: str = "local"
    stun_port: int = -1


def derp_map(derp: DerpNode) -> dict[str, Any]:
    node = {
        "Name": f"{derp.region_id}a",
        "RegionID": derp.region_id,
        "HostName": derp.host,
        "IPv4": derp.host if ":" not in derp.host else "none",
        "IPv6": derp.host if ":" in derp.host else "none",
        "DERPPort": derp.port,
        "STUNPort": derp.stun_port,
        "InsecureForTests": True,
    }
    region = {
        "RegionID": derp.region_id,
        "RegionCode": derp.region_code,
        "RegionName": "Local test relay",
        "Nodes": [node],
    }
    return {"Regions": {str(derp.region_id): region}, "OmitDefaultRegions": True}


# Node attributes for the node's own record: no captive-portal probes of tailscale.com (they cannot
# succeed in a test namespace and hold the node in "Starting" for seconds).
SELF_NODE_ATTRS = ("disable-captive-portal-detection",)


def node_record(reg: Registry, node: Node, derp: DerpNode, *, self_view: bool = False) -> dict[str, Any]:
    addresses = [f"{node.ipv4}/32", f"{node.ipv6}/128"]
    home = node.home_derp or derp.region_id
    return {
        "ID": node.id,
        "StableID": f"n{node.id:x}CNTRL",
        "Name": reg.fqdn(node),
        "User": node.user_id,
        "Key": keys.format_public(node.node_key, keys.NODE),
        "KeyExpiry": ZERO_TIME,
        "Machine": keys.format_public(node.machine_key, keys.MACHINE),
        "DiscoKey": keys.format_public(node.disco_key or bytes(32), keys.DISCO),
        "Addresses": addresses,
        "AllowedIPs": addresses,
        "Endpoints": list(node.endpoints),
        "DERP": f"{DERP_MAGIC_IP}:{home}",
        "HomeDERP": home,
        "Hostinfo": node.hostinfo,
        "Created": rfc3339(node.created),
        "Cap": node.capver,
        "Tags": list(node.tags),
        "PrimaryRoutes": [],
        "LastSeen": rfc3339(node.last_seen),
        "Online": node.online,
        "MachineAuthorized": True,
        "ComputedName": node.name,
        "ComputedNameWithHost": node.name,
        **(
            {"Capabilities": list(SELF_NODE_ATTRS), "CapMap": {attr: None for attr in SELF_NODE_ATTRS}}
            if self_view
            else {}
        ),
    }


def dns_config(reg: Registry, node: Node) -> dict[str, Any]:
    """MagicDNS on, and ``CertDomains``: the names this node may get a TLS certificate for (its
    own MagicDNS name, as Tailscale sends with HTTPS enabled; nodes refuse any other name)."""
    return {
        "Resolvers": [],
        "Routes": {},
        "Domains": [reg.domain],
        "Proxied": True,
        "CertDomains": [reg.cert_domain(node)],
    }


def map_response(
    reg: Registry, node: Node, derp: DerpNode, *, omit_peers: bool = False, now: float | None = None
) -> dict[str, Any]:
    """A full MapResponse for ``node``: itself, every peer, DERP map, DNS, users, allow-all filter."""
    peers = [] if omit_peers else sorted(reg.peers_of(node), key=lambda n: n.id)
    user_ids = {node.user_id, *(p.user_id for p in peers)}
    profiles = [reg.users[u].profile() for u in sorted(user_ids) if u in reg.users]
    return {
        "Node": node_record(reg, node, derp, self_view=True),
        "Peers": [node_record(reg, p, derp) for p in peers],
        "DERPMap": derp_map(derp),
        "DNSConfig": dns_config(reg, node),
        "Domain": reg.domain,
        "CollectServices": False,
        "PacketFilter": ALLOW_ALL_FILTER,
        "UserProfiles": profiles,
        "ControlTime": rfc3339(time.time() if now is None else now),
    }


def keep_alive() -> dict[str, Any]:
    return {"KeepAlive": True}


def register_response(reg: Registry, node: Node) -> dict[str, Any]:
    user = reg.user_of(node)
    return {
        "User": {
            "ID": user.id,
            "LoginName": user.login,
            "DisplayName": user.display_name,
            "ProfilePicURL": "",
            "Created": ZERO_TIME,
        },
        "Login": {
            "ID": user.id,
            "Provider": "",
            "LoginName": user.login,
            "DisplayName": user.display_name,
            "ProfilePicURL": "",
        },
        "NodeKeyExpired": node.logged_out,
        "MachineAuthorized": not node.logged_out,
        "AuthURL": "",
    }


def refusal(reason: str) -> dict[str, Any]:
    return {"Error": reason, "MachineAuthorized": False, "AuthURL": ""}
