"""Auth keys for the nodes: read at start, minted from an OAuth client secret when needed.

Sources, first found wins: ``--authkey-path`` / ``authkey_path``, ``$TS_AUTHKEY``, then systemd's
credential ``$CREDENTIALS_DIRECTORY/authkey`` (``LoadCredential=authkey:/run/keys/…``).

An auth key only matters for a node's first registration: once ``tailscaled.state`` exists in its
state directory the node logs in with its own key, so no key is minted then (tsnsrv mints one on
every start). A ``tskey-client-…`` secret mints a one-off, pre-tagged key through the Tailscale API
(the PyPI ``tailscale`` package: asyncio + aiohttp, run in a worker thread with its own loop).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import trio

from common.problems import ConfigError, Problem

from .model import OAUTH_PREFIX, Secret, ValidConfig, ValidService

log = logging.getLogger(__name__)

SessionFactory = Callable[[], Any]  # () -> aiohttp.ClientSession, for tests


API_HOST = "api.tailscale.com"
API_ADDR_ENV = "HARMONIA_SIDECAR_TS_API_ADDR"


class MintError(Exception):
    pass


def api_session_factory(addr: str, ca_file: str | None = None) -> SessionFactory:
    """Sessions that connect to ``host:port`` for api.tailscale.com (TLS still checks that name,
    against ``ca_file`` when given). For tests against a local API; the CLI takes it from
    $HARMONIA_SIDECAR_TS_API_ADDR (and the CA from $SSL_CERT_FILE)."""
    import socket
    import ssl

    from aiohttp import ClientSession, TCPConnector
    from aiohttp.abc import AbstractResolver, ResolveResult

    host, _, port_text = addr.rpartition(":")
    port = int(port_text)

    class Fixed(AbstractResolver):
        async def resolve(
            self, name: str, port_: int = 0, family: socket.AddressFamily = socket.AF_INET
        ) -> list[ResolveResult]:
            if name != API_HOST:
                raise OSError(f"only {API_HOST} is reachable through {API_ADDR_ENV}")
            return [
                ResolveResult(
                    hostname=name,
                    host=host,
                    port=port,
                    family=socket.AF_INET,
                    proto=0,
                    flags=socket.AI_NUMERICHOST,
                )
            ]

        async def close(self) -> None:
            return None

    def factory() -> ClientSession:
        context = ssl.create_default_context(cafile=ca_file)
        return ClientSession(connector=TCPConnector(resolver=Fixed(), ssl=context))

    return factory


def node_registered(node_dir: str) -> bool:
    return os.path.exists(os.path.join(node_dir, "tailscaled.state"))


def split_client_secret(secret: str) -> tuple[str, str, dict[str, str]]:
    """``tskey-client-<id>-<rest>[?opts]`` → (client id, secret without options, options)."""
    value, _, query = secret.partition("?")
    body = value[len(OAUTH_PREFIX) :]
    client_id = body.split("-", 1)[0] if "-" in body else body
    opts = {k: v[-1] for k, v in parse_qs(query).items()}
    return client_id, value, opts


async def _mint_async(
    secret: str, tags: list[str], ephemeral: bool, description: str, session_factory: SessionFactory | None
) -> str:
    from tailscale import Tailscale, TailscaleError

    client_id, value, opts = split_client_secret(secret)
    preauthorized = opts.get("preauthorized", "true").lower() != "false"
    ephemeral = opts.get("ephemeral", str(ephemeral)).lower() == "true"
    session = session_factory() if session_factory is not None else None
    client = Tailscale(oauth_client_id=client_id, oauth_client_secret=value, session=session)
    try:
        key = await client.create_key(
            description=description,
            reusable=False,
            ephemeral=ephemeral,
            preauthorized=preauthorized,
            tags=tags,
            expiry_seconds=3600,
        )
    except TailscaleError as exc:
        raise MintError(
            f"the Tailscale API refused to mint an auth key for tags {tags}: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        if session is not None:
            await session.close()
        await client.close()
    if not key.key:
        raise MintError("the Tailscale API answered without a key")
    return str(key.key)


async def mint_auth_key(
    secret: Secret,
    tags: list[str],
    ephemeral: bool,
    description: str,
    session_factory: SessionFactory | None = None,
) -> Secret:
    """Mint a single-use auth key for ``tags``; runs the asyncio client in a worker thread."""
    if not tags:
        raise MintError("an OAuth client secret can only mint keys for tagged nodes: give tags")

    def run() -> str:
        return asyncio.run(_mint_async(secret.reveal(), tags, ephemeral, description, session_factory))

    return Secret(await trio.to_thread.run_sync(run, abandon_on_cancel=True))


async def resolve_auth_keys(
    cfg: ValidConfig,
    services: list[ValidService] | None = None,
    session_factory: SessionFactory | None = None,
) -> dict[str, Secret | None]:
    """Each service's auth key (None when none is given or none is needed).

    Every unreadable file or failed mint is collected and raised as one ``ConfigError``.
    """
    problems: list[Problem] = []
    keys: dict[str, Secret | None] = {}
    for s in services if services is not None else list(cfg.services):
        key: Secret | None = None
        source = f"{s.name}.authkey_path"
        if s.auth.path is not None:
            try:
                text = (await trio.Path(s.auth.path).read_text(encoding="utf-8")).strip()
            except OSError as exc:
                problems.append(Problem(source, f"cannot read {s.auth.path!r}: {exc.strerror}"))
                continue
            if not text:
                problems.append(Problem(source, f"{s.auth.path!r} is empty"))
                continue
            key = Secret(text)
        elif s.auth.env_value is not None:
            key, source = s.auth.env_value, "TS_AUTHKEY"
        elif s.auth.credential is not None:
            try:
                text = (await trio.Path(s.auth.credential).read_text(encoding="utf-8")).strip()
            except FileNotFoundError:
                text = None  # no credential of that name: no key, as when none is given
            except OSError as exc:
                problems.append(
                    Problem(source, f"cannot read the credential {s.auth.credential!r}: {exc.strerror}")
                )
                continue
            if text == "":
                problems.append(Problem(source, f"the credential {s.auth.credential!r} is empty"))
                continue
            if text is not None:
                key, source = Secret(text), s.auth.credential
                log.info("%s: auth key from the credential %s", s.name, s.auth.credential)
        if key is not None and key.is_oauth_client_secret:
            if node_registered(s.node_dir):
                log.info("%s: already registered; not minting an auth key", s.name)
                key = None
            elif not s.tags:
                problems.append(
                    Problem(
                        f"{s.name}.tag",
                        f"{source} holds an OAuth client secret, which can only mint keys for tagged nodes",
                    )
                )
                continue
            else:
                try:
                    key = await mint_auth_key(
                        key, list(s.tags), s.ephemeral, f"harmonia-sidecar {s.name}", session_factory
                    )
                    log.info("%s: minted a single-use auth key for %s", s.name, ",".join(s.tags))
                except MintError as exc:
                    problems.append(Problem(source, str(exc)))
                    continue
        keys[s.name] = key
    if problems:
        raise ConfigError(problems)
    return keys
