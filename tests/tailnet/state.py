"""The tailnet's registry: users, pre-auth keys, nodes and their addresses.

No sockets here. Every change bumps a version and wakes whoever waits on :meth:`Registry.changed`
(the map streams), so each node is pushed a fresh full map. A node is identified by its machine key:
the same machine (same state directory) keeps its ID, name and addresses across restarts and
re-registrations; another machine asking for a taken name gets ``name-1``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger("tailnet.state")

IPV4_PREFIX = ipaddress.IPv4Network("100.64.0.0/10")
IPV6_PREFIX = ipaddress.IPv6Network("fd7a:115c:a1e0::/48")
TAGGED_DEVICES_USER_ID = 2147455555


class Refused(Exception):
    """A request the tailnet turns down; ``reason`` is safe to show the client, ``status`` is HTTP."""

    def __init__(self, reason: str, status: int = 401) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class User:
    id: int
    login: str
    display_name: str

    def profile(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "LoginName": self.login,
            "DisplayName": self.display_name,
            "ProfilePicURL": "",
            "Roles": [],
        }


TAGGED_DEVICES = User(TAGGED_DEVICES_USER_ID, "tagged-devices", "Tagged Devices")


@dataclass
class AuthKey:
    """A pre-auth key. ``key`` is the secret ``tskey-auth-<id>-<secret>``; reprs hide it."""

    id: str
    key: str = field(repr=False)
    user_id: int
    reusable: bool = False
    ephemeral: bool = False
    tags: tuple[str, ...] = ()
    expires: float | None = None
    used: bool = False
    description: str = ""
    created: float = field(default_factory=time.time)


@dataclass
class Node:
    id: int
    machine_key: bytes
    node_key: bytes
    name: str
    user_id: int
    ipv4: str
    ipv6: str
    hostinfo: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    ephemeral: bool = False
    disco_key: bytes | None = None
    endpoints: list[str] = field(default_factory=list)
    home_derp: int = 0
    capver: int = 0
    created: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    logged_out: bool = False
    streams: int = 0  # live map streams; not persisted

    @property
    def online(self) -> bool:
        return self.streams > 0


_TAG_RE = re.compile(r"^tag:[a-z0-9][a-z0-9-]*$", re.IGNORECASE)


def check_tags(tags: object) -> tuple[str, ...]:
    if tags is None:
        return ()
    if not isinstance(tags, list | tuple) or not all(isinstance(t, str) for t in tags):
        raise Refused("tags must be a list of strings", 400)
    for tag in tags:
        if not _TAG_RE.match(tag):
            raise Refused(f"invalid tag {tag!r}: tags look like tag:name", 400)
    return tuple(tags)


def sanitize_hostname(hostname: object) -> str:
    text = hostname if isinstance(hostname, str) else ""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].strip("-")
    return label or "node"


def _address(prefix: ipaddress.IPv4Network | ipaddress.IPv6Network, index: int) -> str:
    return str(prefix.network_address + index)


@dataclass
class SetDnsCall:
    node: str
    name: str
    type: str
    granted: bool


class Registry:
    def __init__(self, *, domain: str, default_user: User, state_path: Path | None = None) -> None:
        self.domain = domain
        self.default_user = default_user
        self.users: dict[int, User] = {default_user.id: default_user, TAGGED_DEVICES.id: TAGGED_DEVICES}
        self.keys: dict[str, AuthKey] = {}
        self.nodes: dict[int, Node] = {}
        self.version = 0
        self.sent_peers: dict[str, list[str]] = {}
        """Node name → peer names in the last full map actually sent on its stream."""
        self.dns_txt: dict[str, list[str]] = {}
        """Lower-case ``_acme-challenge.<node>.<domain>`` → TXT values stored through set-dns."""
        self.set_dns_calls: list[SetDnsCall] = []
        """Every ``/machine/set-dns`` request, granted or refused, in order."""
        self._next_node_id = 1
        self._next_address = 1
        self._changed = trio.Event()
        self._state_path = state_path
        if state_path is not None and state_path.exists():
            self._load(state_path)

    # -- change notification -------------------------------------------------------------------

    def bump(self, why: str) -> None:
        self.version += 1
        log.debug("tailnet changed (v%d): %s", self.version, why)
        self._changed.set()
        self._changed = trio.Event()
        self._save()

    async def changed(self) -> None:
        """Wait for the next change."""
        await self._changed.wait()

    # -- keys --------------------------------------------------------------------------------

    def mint_key(
        self,
        *,
        user: User | None = None,
        reusable: bool = False,
        ephemeral: bool = False,
        tags: tuple[str, ...] | list[str] = (),
        expiry_seconds: float | None = None,
        description: str = "",
    ) -> AuthKey:
        key_id = "k" + secrets.token_hex(6)
        user = user or self.default_user
        self.users.setdefault(user.id, user)
        key = AuthKey(
            id=key_id,
            key=f"tskey-auth-{key_id}-{secrets.token_hex(16)}",
            user_id=user.id,
            reusable=reusable,
            ephemeral=ephemeral,
            tags=check_tags(list(tags)),
            expires=None if expiry_seconds is None else time.time() + expiry_seconds,
            description=description,
        )
        self.keys[key.key] = key
        self._save()
        return key

    def _redeem(self, text: object, now: float) -> AuthKey:
        if not isinstance(text, str) or not text:
            raise Refused("no auth key given and this node is not registered")
        key = self.keys.get(text)
        if key is None:
            raise Refused("invalid auth key: unknown to this tailnet")
        if key.expires is not None and key.expires <= now:
            raise Refused(f"invalid auth key: {key.id} has expired")
        if key.used and not key.reusable:
            raise Refused(f"invalid auth key: {key.id} is single-use and was already used")
        return key

    # -- nodes -------------------------------------------------------------------------------

    def by_machine(self, machine_key: bytes) -> Node | None:
        return next((n for n in self.nodes.values() if n.machine_key == machine_key), None)

    def by_node_key(self, node_key: bytes) -> Node | None:
        return next((n for n in self.nodes.values() if n.node_key == node_key), None)

    def _unique_name(self, wanted: str, node_id: int | None) -> str:
        taken = {n.name for n in self.nodes.values() if n.id != node_id}
        if wanted not in taken:
            return wanted
        i = 1
        while f"{wanted}-{i}" in taken:
            i += 1
        return f"{wanted}-{i}"

    def _allocate_addresses(self) -> tuple[str, str]:
        while True:
            index = self._next_address
            self._next_address += 1
            v4 = ipaddress.IPv4Address(_address(IPV4_PREFIX, index))
            if v4.packed[-1] not in (0, 255) and str(v4) != "100.100.100.100":
                return str(v4), _address(IPV6_PREFIX, index)

    def register(
        self,
        *,
        machine_key: bytes,
        node_key: bytes,
        old_node_key: bytes | None,
        auth_key: object,
        hostinfo: dict[str, Any],
        expiry: float | None,
        capver: int,
        now: float | None = None,
    ) -> Node:
        """Register (or re-register, or log out) the node of ``machine_key``. Raises :class:`Refused`."""
        now = time.time() if now is None else now
        node = self.by_machine(machine_key)
        other = self.by_node_key(node_key)
        if other is not None and other.machine_key != machine_key:
            raise Refused("node key is already in use by another machine", 409)
        if expiry is not None and expiry <= now:
            if node is None:
                raise Refused("logout of a node this tailnet does not know")
            self._logout(node)
            return node
        known_key = (
            node is not None
            and not node.logged_out
            and (node.node_key == node_key or (old_node_key is not None and node.node_key == old_node_key))
        )
        if node is not None and known_key and not auth_key:
            node.node_key = node_key
            node.hostinfo = hostinfo or node.hostinfo
            node.capver = capver
            node.last_seen = now
            self.bump(f"node {node.name} re-registered")
            return node
        key = self._redeem(auth_key, now)
        key.used = True
        user_id = TAGGED_DEVICES.id if key.tags else key.user_id
        wanted = sanitize_hostname(hostinfo.get("Hostname"))
        if node is None:
            v4, v6 = self._allocate_addresses()
            node = Node(
                id=self._next_node_id,
                machine_key=machine_key,
                node_key=node_key,
                name=self._unique_name(wanted, None),
                user_id=user_id,
                ipv4=v4,
                ipv6=v6,
                created=now,
            )
            self._next_node_id += 1
            self.nodes[node.id] = node
            what = "registered"
        else:
            what = "re-registered with a key"
            if node.name != wanted and not node.name.startswith(wanted + "-"):
                node.name = self._unique_name(wanted, node.id)
        node.node_key = node_key
        node.user_id = user_id
        node.tags = key.tags
        node.ephemeral = key.ephemeral
        node.hostinfo = hostinfo
        node.capver = capver
        node.logged_out = False
        node.last_seen = now
        log.info(
            "node %s (%s, %s) %s with key %s%s",
            node.name,
            node.ipv4,
            node.ipv6,
            what,
            key.id,
            " (ephemeral)" if node.ephemeral else "",
        )
        self.bump(f"node {node.name} {what}")
        return node

    def _logout(self, node: Node) -> None:
        if node.ephemeral:
            self.remove(node, "logged out")
        else:
            node.logged_out = True
            self.bump(f"node {node.name} logged out")

    def remove(self, node: Node, why: str) -> None:
        if self.nodes.pop(node.id, None) is not None:
            log.info("node %s removed: %s", node.name, why)
            self.bump(f"node {node.name} removed")

    def node_for_request(self, machine_key: bytes, node_key: bytes) -> Node:
        node = self.by_node_key(node_key)
        if node is None or node.logged_out:
            raise Refused("node key not registered with this tailnet", 401)
        if node.machine_key != machine_key:
            raise Refused("node key belongs to another machine", 403)
        return node

    def peers_of(self, node: Node) -> list[Node]:
        return [n for n in self.nodes.values() if n.id != node.id and not n.logged_out]

    def reap_ephemeral(self, *, grace: float, now: float | None = None) -> list[Node]:
        now = time.time() if now is None else now
        gone = [
            n for n in self.nodes.values() if n.ephemeral and n.streams == 0 and now - n.last_seen >= grace
        ]
        for node in gone:
            self.remove(node, f"ephemeral and offline for {grace:g}s")
        return gone

    def user_of(self, node: Node) -> User:
        return self.users.get(node.user_id, self.default_user)

    def fqdn(self, node: Node) -> str:
        return f"{node.name}.{self.domain}."

    def cert_domain(self, node: Node) -> str:
        """The one name ``node`` may get a certificate for (its MagicDNS name, no trailing dot)."""
        return self.fqdn(node).rstrip(".")

    # -- DNS records for ACME dns-01 ----------------------------------------------------------

    def set_dns(self, node: Node, *, name: object, rtype: object, value: object) -> None:
        """``POST /machine/set-dns``: store a TXT record, only ``_acme-challenge.<node's name>``.

        Raises :class:`Refused` (400 for a malformed request, 403 for another node's name). Every
        call is recorded in :attr:`set_dns_calls` and logged as ``set-dns {json}`` (``node``,
        ``name``, ``type``, ``granted``), which is how a test counts them in the CLI's log."""
        call = SetDnsCall(node=node.name, name=str(name), type=str(rtype), granted=False)
        self.set_dns_calls.append(call)
        try:
            wanted = self._check_set_dns(node, name, rtype, value)
        except Refused:
            log.warning("set-dns %s", json.dumps(asdict(call)))
            raise
        values = self.dns_txt.setdefault(wanted, [])
        if value not in values:
            values.append(str(value))
            del values[:-4]  # a new order's challenge; a few stale values do no harm
        call.granted = True
        log.info("set-dns %s", json.dumps(asdict(call)))

    def _check_set_dns(self, node: Node, name: object, rtype: object, value: object) -> str:
        allowed = "_acme-challenge." + self.cert_domain(node).lower()
        if not isinstance(name, str) or not name:
            raise Refused("set-dns: 'Name' must be a non-empty string", 400)
        if rtype != "TXT":
            raise Refused(f"set-dns: only TXT records can be set, not {rtype!r}", 400)
        if not isinstance(value, str) or not value or len(value) > 255:
            raise Refused("set-dns: 'Value' must be a string of 1 to 255 characters", 400)
        wanted = name.lower().rstrip(".")
        if wanted != allowed:
            raise Refused(f"set-dns: node {node.name!r} may only set {allowed!r}, not {name!r}", 403)
        return wanted

    def dns_hosts(self) -> dict[str, list[str]]:
        """Lower-case node names (``web.<domain>``) → their tailnet addresses."""
        return {
            self.cert_domain(n).lower(): [n.ipv4, n.ipv6] for n in self.nodes.values() if not n.logged_out
        }

    # -- persistence -------------------------------------------------------------------------

    def _save(self) -> None:
        if self._state_path is None:
            return
        data = {
            "next_node_id": self._next_node_id,
            "next_address": self._next_address,
            "users": [asdict(u) for u in self.users.values()],
            "keys": [{**asdict(k), "tags": list(k.tags)} for k in self.keys.values()],
            "nodes": [
                {
                    **asdict(n),
                    "machine_key": n.machine_key.hex(),
                    "node_key": n.node_key.hex(),
                    "disco_key": n.disco_key.hex() if n.disco_key else None,
                    "tags": list(n.tags),
                    "streams": 0,
                }
                for n in self.nodes.values()
                if not n.ephemeral
            ],
        }
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self._state_path)

    def _load(self, path: Path) -> None:
        data = json.loads(path.read_text())
        self._next_node_id = int(data["next_node_id"])
        self._next_address = int(data["next_address"])
        for u in data["users"]:
            self.users[int(u["id"])] = User(int(u["id"]), u["login"], u["display_name"])
        for k in data["keys"]:
            key = AuthKey(**{**k, "tags": tuple(k["tags"])})
            self.keys[key.key] = key
        for n in data["nodes"]:
            node = Node(
                **{
                    **n,
                    "machine_key": bytes.fromhex(n["machine_key"]),
                    "node_key": bytes.fromhex(n["node_key"]),
                    "disco_key": bytes.fromhex(n["disco_key"]) if n["disco_key"] else None,
                    "tags": tuple(n["tags"]),
                }
            )
            self.nodes[node.id] = node
        log.info("loaded %d nodes from %s", len(self.nodes), path)
