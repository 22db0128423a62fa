"""``serve_tailnet``: the coordination server, the DERP relay and the API, as one trio service.

Two listeners on ``config.host``:

* control (plain HTTP): ``GET /key``, ``POST /ts2021`` (Noise, then HTTP/2), the API;
* relay (HTTPS with a throwaway CA's certificate): ``GET /derp`` (upgrade), ``/derp/latency-check``,
  ``/generate_204``, the API (so the ``tailscale`` package can reach it as ``https://…``).

With ``TailnetConfig.acme`` also a DNS responder (UDP, :mod:`.dns`) for the TXT records nodes set
through ``/machine/set-dns``, and pebble validating against it (:mod:`.acme`): nodes get HTTPS
certificates the way Tailscale's do (docs/tailnet.md, *HTTPS certificates*).

Every connection is handled on its own; a peer that misbehaves gets a refusal and a log line, and
the others are not disturbed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import json
import logging
import secrets
import ssl
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import trio
import trustme

from . import dns, keys, mapresp, noise
from .acme import AcmeServer, serve_pebble
from .api import Api, OAuthClient
from .control import ControlConnection, ControlSettings
from .derp import DerpServer
from .keys import PrivateKey
from .state import AuthKey, Node, Registry, User
from .streams import NoiseStream, PeerClosed, Reader
from .stun import bind_stun, serve_stun
from .wire import encode_early_payload

log = logging.getLogger("tailnet")

CAPVER_EARLY_NOISE = 49
MAX_REQUEST_BODY = 1 << 20


@dataclass(frozen=True)
class TailnetConfig:
    host: str = "127.0.0.1"
    """Address to bind and to advertise (control URL, DERP map). Inside a test namespace, its veth
    address (``Netns.address``) or 127.0.0.1 both work."""
    control_port: int = 0
    derp_port: int = 0
    domain: str = "tailnet.test"
    user_login: str = "tester@example.com"
    user_display_name: str = "Test User"
    map_keepalive: float = 30.0
    derp_keepalive: float = 60.0
    ephemeral_grace: float = 5.0
    """An ephemeral node with no map stream for this long is removed."""
    io_timeout: float = 15.0
    """Limit for reading a request's headers and for the TLS and Noise handshakes."""
    stun: bool = True
    """Answer STUN on the relay's port number (UDP): nodes then finish netcheck at once."""
    state_path: Path | None = None
    """Persist users, keys and nodes here (JSON) so a restarted server still knows its nodes."""
    acme: bool = False
    """HTTPS certificates the way Tailscale issues them: a DNS responder for the dns-01 records
    nodes set through ``/machine/set-dns``, and pebble (an ACME server) validating against it.
    Use a ``*.ts.net``-shaped ``domain``: caddy-tailscale's ``get_certificate tailscale`` asks only
    for such names (the ``tailscale+tls`` listener does not care)."""
    dns: bool = False
    """Run the DNS responder (always on with ``acme``): set-dns TXT records, nodes' addresses."""
    dns_port: int = 0
    """UDP port of the DNS responder."""
    acme_dir: Path | None = None
    """Where pebble's config, log and root go (with ``acme``); a temporary directory if unset."""


@dataclass
class Tailnet:
    """What :func:`serve_tailnet` bound and made; hand it to tests."""

    config: TailnetConfig
    control_url: str
    derp_url: str
    api_url: str
    registry: Registry
    derp: DerpServer
    api: Api
    ca: trustme.CA
    auth_key: AuthKey
    ephemeral_auth_key: AuthKey
    tagged_auth_key: AuthKey
    oauth_client: OAuthClient
    api_key: str = field(repr=False)
    acme: AcmeServer | None = None
    """pebble, with ``TailnetConfig.acme``."""
    dns_server: str | None = None
    """``host:port`` of the DNS responder (UDP), with ``TailnetConfig.acme`` or ``dns``."""

    @property
    def ca_cert_pem(self) -> bytes:
        return self.ca.cert_pem.bytes()

    def info(self, ca_cert_path: str | None = None) -> dict[str, Any]:
        """The JSON line ``python -m tests.tailnet`` prints."""
        out: dict[str, Any] = {
            "control_url": self.control_url,
            "auth_key": self.auth_key.key,
            "ephemeral_auth_key": self.ephemeral_auth_key.key,
            "tagged_auth_key": self.tagged_auth_key.key,
            "tags": list(self.tagged_auth_key.tags),
            "derp_url": self.derp_url,
            "api_url": self.api_url,
            "api_key": self.api_key,
            "oauth_client_id": self.oauth_client.id,
            "oauth_client_secret": self.oauth_client.secret,
            "domain": self.config.domain,
            "user": self.config.user_login,
        }
        if ca_cert_path is not None:
            out["ca_cert"] = ca_cert_path
        if self.acme is not None:
            out["ca_file"] = str(self.acme.root_path)
            out["env"] = self.acme.node_env()
            out["acme_directory_url"] = self.acme.directory_url
            out["dns_server"] = self.dns_server
        return out

    def lookup_dns(self, query: dns.Query) -> tuple[int, list[dns.Record]]:
        """The DNS responder's answer: set-dns TXT records and the nodes' addresses."""
        reg = self.registry
        return dns.answer(query, domain=reg.domain, txt=reg.dns_txt, hosts=reg.dns_hosts())

    def mint_key(
        self,
        *,
        reusable: bool = True,
        ephemeral: bool = False,
        tags: tuple[str, ...] = (),
        expiry_seconds: float | None = None,
    ) -> str:
        return self.registry.mint_key(
            reusable=reusable, ephemeral=ephemeral, tags=tags, expiry_seconds=expiry_seconds
        ).key

    def node(self, name: str) -> Node | None:
        return next((n for n in self.registry.nodes.values() if n.name == name), None)

    def peer_names(self, name: str) -> set[str]:
        """Names of the peers the node ``name`` is sent in its map (empty if it is unknown)."""
        node = self.node(name)
        return set() if node is None else {p.name for p in self.registry.peers_of(node)}

    def sent_peer_names(self, name: str) -> set[str]:
        """Peer names in the last map actually sent to ``name`` on its map stream."""
        return set(self.registry.sent_peers.get(name, ()))

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds, re-checking at every change (put it under a timeout)."""
        while not predicate():
            with trio.move_on_after(0.5):
                await self.registry.changed()

    def relay_connected(self, name: str) -> bool:
        node = self.node(name)
        return node is not None and node.node_key in self.derp.connected()

    async def wait_for_node(self, name: str, *, relay: bool = True) -> Node:
        """Wait until ``name`` is registered, polling its map (and connected to the relay)."""
        await self.wait_until(
            lambda: (
                (n := self.node(name)) is not None and n.online and (not relay or self.relay_connected(name))
            )
        )
        node = self.node(name)
        assert node is not None
        return node


_DISCONNECTS = (trio.BrokenResourceError, trio.ClosedResourceError, PeerClosed)


def only_disconnects(exc: BaseException) -> bool:
    """Whether ``exc`` (possibly a group from nested nurseries) only says the peer went away."""
    if isinstance(exc, BaseExceptionGroup):
        return all(only_disconnects(e) for e in exc.exceptions)
    return isinstance(exc, _DISCONNECTS)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class _Service:
    def __init__(
        self,
        tailnet: Tailnet,
        server_key: PrivateKey,
        legacy_key: PrivateKey,
        tls: ssl.SSLContext,
        stun_port: int,
    ) -> None:
        self.t = tailnet
        self.server_key = server_key
        self.legacy_key = legacy_key
        self.tls = tls
        self.challenge = PrivateKey.generate()
        self.control = ControlSettings(
            tailnet.registry,
            mapresp.DerpNode(
                tailnet.config.host,
                int(urllib.parse.urlsplit(tailnet.derp_url).port or 443),
                stun_port=stun_port,
            ),
            keepalive_interval=tailnet.config.map_keepalive,
        )

    # -- connections -------------------------------------------------------------------------

    async def on_control(self, stream: trio.SocketStream) -> None:
        await self._guard(stream, tls=False)

    async def on_relay(self, stream: trio.SocketStream) -> None:
        await self._guard(stream, tls=True)

    async def _guard(self, raw: trio.SocketStream, *, tls: bool) -> None:
        try:
            host, port = raw.socket.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "?"
        stream: trio.abc.Stream = raw
        try:
            if tls:
                ssl_stream = trio.SSLStream(raw, self.tls, server_side=True, https_compatible=True)
                try:
                    with trio.fail_after(self.t.config.io_timeout):
                        await ssl_stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    log.warning("%s: TLS handshake failed: %s", peer, exc.__cause__ or exc)
                    return
                stream = ssl_stream
            await self._serve_http(stream, peer, tls=tls)
        except trio.TooSlowError:
            log.warning("%s: too slow (%gs), closing", peer, self.t.config.io_timeout)
        except Exception as exc:
            if only_disconnects(exc):
                log.debug("%s: connection lost: %r", peer, exc)
            else:
                log.exception("%s: unexpected error; connection closed, server keeps serving", peer)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

    async def _serve_http(self, stream: trio.abc.Stream, peer: str, *, tls: bool) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=32 * 1024)

        async def next_event() -> Any:
            while True:
                event = conn.next_event()
                if event is not h11.NEED_DATA:
                    return event
                data = await stream.receive_some(65536)
                conn.receive_data(bytes(data))

        while True:
            try:
                # an idle kept-alive connection may wait; a started request must not dawdle
                with trio.move_on_after(self.t.config.io_timeout) as idle:
                    while conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                        data = await stream.receive_some(65536)
                        conn.receive_data(bytes(data))
                        if not data:
                            break
                if idle.cancelled_caught:
                    log.debug("%s: idle connection closed", peer)
                    return
                with trio.fail_after(self.t.config.io_timeout):
                    request = await next_event()
                    if isinstance(request, h11.ConnectionClosed):
                        return
                    if not isinstance(request, h11.Request):
                        return
                    body = bytearray()
                    while True:
                        event = await next_event()
                        if isinstance(event, h11.Data):
                            body += event.data
                            if len(body) > MAX_REQUEST_BODY:
                                log.warning("%s: request body too large", peer)
                                await self._plain(stream, conn, 413, b"request body too large\n", close=True)
                                return
                        elif isinstance(event, h11.EndOfMessage):
                            break
                        else:
                            return
            except h11.RemoteProtocolError as exc:
                log.warning("%s: malformed HTTP request: %s", peer, exc)
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await self._plain(
                        stream, conn, exc.error_status_hint, f"bad request: {exc}\n".encode(), close=True
                    )
                return
            method = request.method.decode()
            target = request.target.decode("latin-1")
            headers = {k.decode().lower(): v.decode("latin-1") for k, v in request.headers}
            path = urllib.parse.urlsplit(target).path
            log.debug("%s: %s %s", peer, method, target)
            if path == "/key" and method == "GET":
                body_out = json.dumps(
                    {
                        "publicKey": keys.format_public(self.server_key.public, keys.MACHINE),
                        "legacyPublicKey": keys.format_public(self.legacy_key.public, keys.MACHINE),
                    }
                ).encode()
                # The Rust client stalls on a kept-alive reply: close after /key.
                await self._plain(stream, conn, 200, body_out, ctype="application/json", close=True)
                return
            if path == "/ts2021" and method == "POST":
                await self._ts2021(stream, conn, headers, peer)
                return
            if path == "/derp" and method == "GET":
                await self._derp(stream, conn, headers, peer)
                return
            if path in ("/derp/latency-check", "/derp/probe") and method in ("GET", "HEAD"):
                await self._plain(stream, conn, 200, b"")
            elif path == "/generate_204":
                await self._plain(stream, conn, 204, b"")
            elif path.startswith("/api/v2/"):
                resp = self.t.api.handle(method, target, headers, bytes(body))
                if resp.status >= 400:
                    log.warning(
                        "%s: API %s %s refused (%d): %s",
                        peer,
                        method,
                        path,
                        resp.status,
                        resp.body.get("message"),
                    )
                await self._plain(stream, conn, resp.status, resp.encode(), ctype="application/json")
            else:
                await self._plain(stream, conn, 404, b"not found\n")
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # MUST_CLOSE, or a cycle that cannot go on
            conn.start_next_cycle()

    async def _plain(
        self,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        status: int,
        body: bytes,
        *,
        ctype: str = "text/plain",
        close: bool = False,
    ) -> None:
        headers = [("Content-Type", ctype), ("Content-Length", str(len(body)))]
        if close:
            headers.append(("Connection", "close"))
        data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
        if body:
            data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)

    # -- upgrades ----------------------------------------------------------------------------

    def _switch(self, conn: h11.Connection, headers: list[tuple[bytes, bytes]]) -> bytes:
        return conn.send(h11.InformationalResponse(status_code=101, headers=headers)) or b""

    async def _ts2021(
        self, stream: trio.abc.Stream, conn: h11.Connection, headers: dict[str, str], peer: str
    ) -> None:
        if headers.get("upgrade", "").lower() != "tailscale-control-protocol":
            log.warning("%s: /ts2021 without 'Upgrade: tailscale-control-protocol'", peer)
            await self._plain(stream, conn, 400, b"unknown or missing next protocol\n", close=True)
            return
        try:
            initiation = base64.b64decode(headers.get("x-tailscale-handshake", ""), validate=True)
        except (binascii.Error, ValueError):
            initiation = b""
        if not initiation:
            log.warning("%s: /ts2021 without a valid X-Tailscale-Handshake header", peer)
            await self._plain(
                stream, conn, 400, b"missing or invalid Tailscale handshake header\n", close=True
            )
            return
        data = self._switch(conn, [(b"Upgrade", b"tailscale-control-protocol"), (b"Connection", b"upgrade")])
        leftover, _ = conn.trailing_data
        try:
            response, transport = noise.respond(self.server_key, initiation)
        except noise.NoiseError as exc:
            log.warning("%s: Noise handshake refused: %s", peer, exc)
            await stream.send_all(data + noise.error_message("handshake failed"))
            return
        await stream.send_all(data + response)
        ns = NoiseStream(stream, Reader(stream, leftover), transport)
        who = keys.format_public(transport.peer_static, keys.MACHINE)
        log.info("%s: Noise session with %s… (capability version %d)", peer, who[:20], transport.version)
        if transport.version >= CAPVER_EARLY_NOISE:
            await ns.send_all(encode_early_payload(keys.format_public(self.challenge.public, keys.CHALLENGE)))
        await ControlConnection(ns, self.control, peer).run()

    async def _derp(
        self, stream: trio.abc.Stream, conn: h11.Connection, headers: dict[str, str], peer: str
    ) -> None:
        if headers.get("upgrade", "").lower() not in ("derp", "websocket"):
            await self._plain(stream, conn, 426, b"DERP requires connection upgrade\n", close=True)
            return
        if headers.get("upgrade", "").lower() == "websocket":
            log.warning("%s: DERP over WebSocket is not supported", peer)
            await self._plain(stream, conn, 400, b"DERP over WebSocket is not supported\n", close=True)
            return
        data = self._switch(conn, self.t.derp.upgrade_headers())
        leftover, _ = conn.trailing_data
        if headers.get("derp-fast-start") != "1":
            await stream.send_all(data)
        await self.t.derp.serve(stream, Reader(stream, leftover), peer)


async def _reaper(tailnet: Tailnet) -> None:
    while True:
        await trio.sleep(min(0.5, tailnet.config.ephemeral_grace / 2))
        tailnet.registry.reap_ephemeral(grace=tailnet.config.ephemeral_grace, now=time.time())


async def serve_tailnet(
    config: TailnetConfig | None = None, *, task_status: trio.TaskStatus[Tailnet] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve a local tailnet until cancelled; reports the :class:`Tailnet` once listening."""
    config = config or TailnetConfig()
    if ipaddress.ip_address(config.host).is_unspecified:
        raise ValueError(
            f"bind a concrete address, not {config.host}: it is also advertised "
            "to nodes (control URL, DERP map)"
        )
    control_listeners = await trio.open_tcp_listeners(config.control_port, host=config.host)
    relay_listeners = await trio.open_tcp_listeners(config.derp_port, host=config.host)
    control_port = control_listeners[0].socket.getsockname()[1]
    derp_port = relay_listeners[0].socket.getsockname()[1]
    stun_sock = await bind_stun(config.host, derp_port) if config.stun else None
    host = _url_host(config.host)

    registry = Registry(
        domain=config.domain,
        default_user=User(1, config.user_login, config.user_display_name),
        state_path=config.state_path,
    )
    ca = trustme.CA()
    cert = ca.issue_cert(config.host, "localhost", f"derp.{config.domain}", "api.tailscale.com")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(tls)
    oauth = OAuthClient.generate()
    api_key = "tskey-api-" + secrets.token_hex(16)
    tailnet = Tailnet(
        config=config,
        control_url=f"http://{host}:{control_port}",
        derp_url=f"https://{host}:{derp_port}/derp",
        api_url=f"https://{host}:{derp_port}/api/v2/",
        registry=registry,
        derp=DerpServer(keepalive_interval=config.derp_keepalive),
        api=Api(registry, [oauth], [api_key]),
        ca=ca,
        auth_key=registry.mint_key(reusable=True, description="default"),
        ephemeral_auth_key=registry.mint_key(reusable=True, ephemeral=True, description="ephemeral"),
        tagged_auth_key=registry.mint_key(reusable=True, tags=("tag:server",), description="tagged"),
        oauth_client=oauth,
        api_key=api_key,
    )
    stun_port = stun_sock.getsockname()[1] if stun_sock is not None else -1
    service = _Service(tailnet, PrivateKey.generate(), PrivateKey.generate(), tls, stun_port)
    with contextlib.ExitStack() as cleanup:
        async with trio.open_nursery() as nursery:
            if stun_sock is not None:
                nursery.start_soon(serve_stun, stun_sock)
            nursery.start_soon(_reaper, tailnet)
            nursery.start_soon(trio.serve_listeners, service.on_control, control_listeners)
            nursery.start_soon(trio.serve_listeners, service.on_relay, relay_listeners)
            if config.acme or config.dns:
                dns_sock = await dns.bind_dns(config.host, config.dns_port)
                tailnet.dns_server = f"{host}:{dns_sock.getsockname()[1]}"
                nursery.start_soon(dns.serve_dns, dns_sock, tailnet.lookup_dns)
            if config.acme:
                assert tailnet.dns_server is not None
                acme_dir = config.acme_dir or Path(
                    cleanup.enter_context(tempfile.TemporaryDirectory(prefix="tailnet-acme-"))
                )
                tailnet.acme = await nursery.start(
                    serve_pebble, acme_dir, config.host, tailnet.dns_server, ca, cert
                )
            log.info(
                "local tailnet: control %s, relay %s, domain %s%s",
                tailnet.control_url,
                tailnet.derp_url,
                config.domain,
                f", ACME {tailnet.acme.directory_url}" if tailnet.acme else "",
            )
            task_status.started(tailnet)


@asynccontextmanager
async def running_tailnet(config: TailnetConfig | None = None) -> AsyncIterator[Tailnet]:
    """``async with running_tailnet(cfg) as tailnet:`` — serve_tailnet for the block's duration."""
    async with trio.open_nursery() as nursery:
        tailnet: Tailnet = await nursery.start(serve_tailnet, config)
        yield tailnet
        nursery.cancel_scope.cancel()
