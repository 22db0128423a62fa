"""What a client host needs to substitute from the cache: nix.conf lines and a NixOS snippet.

Pure rendering from :class:`ClientSettings`: both frontends of the cache as substituters (with
``?priority=N``), the cache's trusted public key(s), and cache.nixos.org after them — the shape
of the fleet's common module.

Priority, as Nix reads it: *lower is preferred* (Nix 2.8 documents the store setting as
"priority of this substituter (lower value means higher priority)"); cache.nixos.org advertises
40. The fleet's value, 60, therefore makes cache.nixos.org win for paths both caches hold; pass
``priority`` below 40 for the opposite. Substituters of equal priority are tried in listed order.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from common.problems import ConfigError, Problem, raise_if

__all__ = [
    "CACHE_NIXOS_ORG",
    "CACHE_NIXOS_ORG_KEY",
    "DEFAULT_KEY_NAME",
    "DEFAULT_PRIORITY",
    "ClientSettings",
    "default_substituters",
    "normalize_public_key",
    "render_nix_conf",
    "render_nixos",
]

CACHE_NIXOS_ORG = "https://cache.nixos.org"
CACHE_NIXOS_ORG_KEY = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
DEFAULT_KEY_NAME = "harmonia-raider-1"
DEFAULT_PRIORITY = 60
PUBLIC_FRONTEND = "https://harmonia.arsfeld.one"

_KEY_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_TAILNET = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_NIX_STRING_UNSAFE = re.compile(r'["\\$\s]')


def default_substituters(tailnet: str) -> tuple[str, str]:
    """The fleet's two frontends: the public name, then ``harmonia.<tailnet>.ts.net``."""
    if not _TAILNET.match(tailnet):
        raise_if([Problem("tailnet", f"{tailnet!r} is not a tailnet name such as 'tail1234'")])
    return (PUBLIC_FRONTEND, f"https://harmonia.{tailnet}.ts.net")


def normalize_public_key(text: str, key_name: str = DEFAULT_KEY_NAME, where: str = "key") -> str:
    """``name:base64`` of a 32-byte ed25519 key; a bare base64 key gets ``key_name``."""
    problems: list[Problem] = []
    value = text.strip()
    name, sep, b64 = value.partition(":")
    if not sep:
        name, b64 = key_name, value
    if not _KEY_NAME.match(name):
        problems.append(Problem(where, f"key name {name!r} must be letters, digits, '.', '_' or '-'"))
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        # a secret key is 64 bytes: say so without echoing it
        hint = " (this looks like a SECRET key: use the public one)" if len(raw) == 64 else ""
        problems.append(Problem(where, f"not a public key (expected name:base64 of 32 bytes){hint}"))
    raise_if(problems)
    return f"{name}:{b64}"


@dataclass(frozen=True)
class ClientSettings:
    """The substituters (in order), their trusted keys, and how cache.nixos.org is added."""

    substituters: tuple[str, ...]
    public_keys: tuple[str, ...]
    priority: int | None = DEFAULT_PRIORITY
    include_cache_nixos_org: bool = True

    def __post_init__(self) -> None:
        problems: list[Problem] = []
        if not self.substituters:
            problems.append(Problem("substituters", "at least one is required"))
        for i, url in enumerate(self.substituters):
            parts = urlsplit(url)
            if (
                parts.scheme not in ("http", "https")
                or not parts.hostname
                or parts.query
                or parts.fragment
                or "@" in parts.netloc
                or _NIX_STRING_UNSAFE.search(url)
            ):
                problems.append(
                    Problem(
                        f"substituters[{i}]",
                        f"{url if '@' not in url else '<redacted>'!r} is not an "
                        "http(s) URL without query, credentials or spaces",
                    )
                )
        if not self.public_keys:
            problems.append(Problem("public_keys", "at least one trusted public key is required"))
        for i, key in enumerate(self.public_keys):
            try:
                normalize_public_key(key, where=f"public_keys[{i}]")
            except ConfigError as exc:
                problems.extend(exc.problems)
        if self.priority is not None and (
            isinstance(self.priority, bool)
            or not isinstance(self.priority, int)
            or not 0 <= self.priority <= 1000
        ):
            problems.append(Problem("priority", f"{self.priority!r} must be an integer in 0..1000"))
        raise_if(problems)

    def substituter_urls(self) -> list[str]:
        ours = [
            url.rstrip("/") + (f"?priority={self.priority}" if self.priority is not None else "")
            for url in self.substituters
        ]
        return ours + ([CACHE_NIXOS_ORG] if self.include_cache_nixos_org else [])

    def trusted_keys(self) -> list[str]:
        keys = list(dict.fromkeys(self.public_keys))
        if self.include_cache_nixos_org and CACHE_NIXOS_ORG_KEY not in keys:
            keys.append(CACHE_NIXOS_ORG_KEY)
        return keys


def render_nix_conf(settings: ClientSettings) -> str:
    """``nix.conf`` lines (also usable as ``NIX_CONFIG``)."""
    return (
        "substituters = " + " ".join(settings.substituter_urls()) + "\n"
        "trusted-public-keys = " + " ".join(settings.trusted_keys()) + "\n"
    )


def render_nixos(settings: ClientSettings) -> str:
    """A NixOS module fragment setting ``nix.settings`` the same way."""
    subs = "\n".join(f'      "{u}"' for u in settings.substituter_urls())
    keys = "\n".join(f'      "{k}"' for k in settings.trusted_keys())
    return (
        "{\n"
        "  nix.settings = {\n"
        "    substituters = [\n"
        f"{subs}\n"
        "    ];\n"
        "    trusted-public-keys = [\n"
        f"{keys}\n"
        "    ];\n"
        "  };\n"
        "}\n"
    )
