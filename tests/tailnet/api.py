"""The slice of the Tailscale v2 API that minting an auth key from an OAuth client needs.

* ``POST /api/v2/oauth/token`` (form: ``client_id``, ``client_secret``, ``grant_type``; or HTTP Basic)
  → ``{"access_token", "token_type": "Bearer", "expires_in", "scope"}``. Like Tailscale, the secret
  (``tskey-client-<id>-<secret>``) is what authenticates; the client id is not checked.
* ``POST /api/v2/tailnet/<tailnet or ->/keys`` (Bearer token or API key) → a new auth key.
  Keys minted with an OAuth token must carry tags, as on Tailscale.
* ``GET /api/v2/tailnet/<tailnet or ->/devices`` (any ``?fields=``) → ``{"devices": [...]}`` in the
  real API's shape: ``id`` (the numeric node ID, as text), ``nodeId`` (the stable ID), ``name``
  (the MagicDNS FQDN, no trailing dot), ``hostname``, ``addresses`` (IPv4 then IPv6), ``tags``
  (only for tagged nodes, as the real API leaves it out otherwise), ``user``, ``os``,
  ``clientVersion``, key expiry, … — what a whois directory reads (sidecar/whois.py).

Handlers are plain functions of (method, path, headers, body) → :class:`ApiResponse`.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from .mapresp import rfc3339
from .state import Refused, Registry, check_tags

TOKEN_LIFETIME = 3600


@dataclass(frozen=True)
class ApiResponse:
    status: int
    body: dict[str, Any]

    def encode(self) -> bytes:
        return json.dumps(self.body).encode()


@dataclass
class OAuthClient:
    id: str
    secret: str = field(repr=False)

    @classmethod
    def generate(cls) -> OAuthClient:
        client_id = "k" + secrets.token_hex(6)
        return cls(client_id, f"tskey-client-{client_id}-{secrets.token_hex(16)}")


@dataclass
class _Token:
    kind: str  # "oauth" or "api"
    expires: float | None


class Api:
    def __init__(self, registry: Registry, clients: list[OAuthClient], api_keys: list[str]) -> None:
        self.registry = registry
        self.clients = {c.secret: c for c in clients}
        self._tokens: dict[str, _Token] = {k: _Token("api", None) for k in api_keys}

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> ApiResponse:
        route = urllib.parse.urlsplit(path).path.rstrip("/")
        parts = route.split("/")
        try:
            if route == "/api/v2/oauth/token":
                if method != "POST":
                    return ApiResponse(405, {"message": "use POST"})
                return self._token(headers, body)
            if len(parts) == 6 and parts[:4] == ["", "api", "v2", "tailnet"]:
                token = self._authorize(headers)
                if parts[5] == "keys" and method == "POST":
                    return self._create_key(token, body)
                if parts[5] == "devices" and method == "GET":
                    return self._devices()
            return ApiResponse(404, {"message": f"{method} {route} is not served by the local tailnet"})
        except Refused as exc:
            return ApiResponse(exc.status, {"message": exc.reason})

    def _token(self, headers: dict[str, str], body: bytes) -> ApiResponse:
        ctype = headers.get("content-type", "")
        if "json" in ctype:
            try:
                form = {str(k): str(v) for k, v in json.loads(body or b"{}").items()}
            except (ValueError, AttributeError):
                raise Refused("malformed JSON body", 400) from None
        else:
            form = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode("latin-1")).items()}
        secret = form.get("client_secret", "")
        auth = headers.get("authorization", "")
        if not secret and auth.lower().startswith("basic "):
            try:
                _, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                raise Refused("malformed basic authorization", 400) from None
        grant = form.get("grant_type", "client_credentials")
        if grant != "client_credentials":
            raise Refused(f"unsupported grant_type {grant!r}", 400)
        if secret not in self.clients:
            raise Refused("invalid OAuth client credentials", 401)
        token = "tskey-oauth-" + secrets.token_hex(16)
        self._tokens[token] = _Token("oauth", time.time() + TOKEN_LIFETIME)
        return ApiResponse(
            200,
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": TOKEN_LIFETIME,
                "scope": "auth_keys devices:core",
            },
        )

    def _authorize(self, headers: dict[str, str]) -> _Token:
        auth = headers.get("authorization", "")
        value = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not value and auth.lower().startswith("basic "):
            try:
                value = base64.b64decode(auth[6:]).decode().partition(":")[0]
            except ValueError:
                value = ""
        token = self._tokens.get(value)
        if token is None or (token.expires is not None and token.expires <= time.time()):
            raise Refused("API token invalid or expired", 401)
        return token

    def _create_key(self, token: _Token, body: bytes) -> ApiResponse:
        try:
            request = json.loads(body or b"{}")
            create = request.get("capabilities", {}).get("devices", {}).get("create", {})
            if not isinstance(create, dict):
                raise ValueError("capabilities.devices.create must be an object")
        except (ValueError, AttributeError) as exc:
            raise Refused(f"malformed key request: {exc}", 400) from None
        if request.get("keyType", "auth") != "auth":
            raise Refused("only auth keys can be created here", 400)
        tags = check_tags(create.get("tags") or [])
        if token.kind == "oauth" and not tags:
            raise Refused("keys created with an OAuth client must have tags", 400)
        expiry = request.get("expirySeconds") or 90 * 86400
        if not isinstance(expiry, int | float) or expiry <= 0:
            raise Refused("expirySeconds must be a positive number", 400)
        key = self.registry.mint_key(
            reusable=bool(create.get("reusable")),
            ephemeral=bool(create.get("ephemeral")),
            tags=tags,
            expiry_seconds=float(expiry),
            description=str(request.get("description", "")),
        )
        return ApiResponse(
            200,
            {
                "id": key.id,
                "key": key.key,
                "keyType": "auth",
                "description": key.description,
                "created": rfc3339(key.created),
                "expires": rfc3339(key.expires or key.created),
                "expirySeconds": int(expiry),
                "invalid": False,
                "tags": list(key.tags),
                "capabilities": {
                    "devices": {
                        "create": {
                            "reusable": key.reusable,
                            "ephemeral": key.ephemeral,
                            "preauthorized": True,
                            "tags": list(key.tags),
                        }
                    }
                },
            },
        )

    def _devices(self) -> ApiResponse:
        reg = self.registry
        devices: list[dict[str, Any]] = []
        for n in sorted(reg.nodes.values(), key=lambda n: n.id):
            if n.logged_out:
                continue
            device: dict[str, Any] = {
                "id": str(n.id),
                "nodeId": f"n{n.id:x}CNTRL",
                "name": reg.fqdn(n).rstrip("."),
                "hostname": str(n.hostinfo.get("Hostname") or n.name),
                "addresses": [n.ipv4, n.ipv6],
                "user": reg.user_of(n).login,
                "os": str(n.hostinfo.get("OS") or ""),
                "clientVersion": str(n.hostinfo.get("IPNVersion") or ""),
                "isEphemeral": n.ephemeral,
                "isExternal": False,
                "connectedToControl": n.online,
                "lastSeen": rfc3339(n.last_seen),
                "created": rfc3339(n.created),
                "expires": "0001-01-01T00:00:00Z",
                "keyExpiryDisabled": True,
                "authorized": True,
                "blocksIncomingConnections": False,
                "updateAvailable": False,
                "nodeKey": f"nodekey:{n.node_key.hex()}",
                "machineKey": f"mkey:{n.machine_key.hex()}",
            }
            if n.tags:  # the real API leaves "tags" out for untagged devices
                device["tags"] = list(n.tags)
            devices.append(device)
        return ApiResponse(200, {"devices": devices})
