"""The control API inside a ts2021 connection: HTTP/2 (server side) over the Noise stream.

Routes: ``POST /machine/register``, ``POST /machine/map`` and ``POST /machine/set-dns`` (the ACME
dns-01 TXT record for the asking node's own name, see :meth:`Registry.set_dns`). Map requests come in three kinds:
a streaming poll (``Stream: true``: a full map now and whenever the tailnet changes, keep-alives in
between), an endpoint update (``Stream: false, OmitPeers: true``: 200 with an empty body), and a
one-shot fetch (one frame, then the end of the body).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from . import keys, mapresp
from .noise import NoiseError
from .state import Node, Refused, Registry
from .streams import NoiseStream
from .wire import encode_map_frame

log = logging.getLogger("tailnet.control")

MAX_BODY = 1 << 20


@dataclass
class ControlSettings:
    registry: Registry
    derp: mapresp.DerpNode
    keepalive_interval: float = 30.0


@dataclass
class _Request:
    stream_id: int
    headers: dict[str, str]
    body: bytearray = field(default_factory=bytearray)
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)


def _parse_time(value: object) -> float | None:
    if not isinstance(value, str) or not value or value.startswith("0001-01-01"):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _optional_key(value: object, prefix: str) -> bytes | None:
    if value in (None, ""):
        return None
    raw = keys.parse_public(value, prefix)
    return None if raw == bytes(32) else raw


class ControlConnection:
    """One client's HTTP/2 connection; every request is handled in its own task."""

    def __init__(self, noise: NoiseStream, settings: ControlSettings, peer: str) -> None:
        self._noise = noise
        self._settings = settings
        self._peer = peer
        self._machine = noise.peer_static
        self._conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self._requests: dict[int, _Request] = {}
        self._window_open = trio.Event()

    @property
    def _who(self) -> str:
        return f"{self._peer} {keys.format_public(self._machine, keys.MACHINE)[:20]}…"

    async def _flush(self) -> None:
        await self._noise.send_all(self._conn.data_to_send())

    async def run(self) -> None:
        self._conn.initiate_connection()
        await self._flush()
        async with trio.open_nursery() as nursery:
            try:
                while True:
                    data = await self._noise.receive_some()
                    if not data:
                        break
                    events = self._conn.receive_data(data)
                    for event in events:
                        self._on_event(event, nursery)
                    await self._flush()
                    if any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
                        # The client is going away (GOAWAY): end the long polls now, or it
                        # waits for them before it can shut down.
                        log.debug("%s: client sent GOAWAY", self._who)
                        break
            except NoiseError as exc:
                log.warning("%s: bad Noise record, closing: %s", self._who, exc)
            except h2.exceptions.ProtocolError as exc:
                log.warning("%s: HTTP/2 protocol error, closing: %s", self._who, exc)
                self._conn.close_connection(error_code=h2.errors.ErrorCodes.PROTOCOL_ERROR)
                with trio.move_on_after(1):
                    await self._flush()
            finally:
                nursery.cancel_scope.cancel()

    def _on_event(self, event: h2.events.Event, nursery: trio.Nursery) -> None:
        if isinstance(event, h2.events.RequestReceived):
            headers = {str(k): str(v) for k, v in (event.headers or [])}
            self._requests[event.stream_id] = _Request(event.stream_id, headers)
        elif isinstance(event, h2.events.DataReceived):
            req = self._requests.get(event.stream_id)
            self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if req is not None:
                req.body += event.data or b""
                if len(req.body) > MAX_BODY:
                    log.warning("%s: request body over %d bytes, refused", self._who, MAX_BODY)
                    self._conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                    del self._requests[event.stream_id]
        elif isinstance(event, h2.events.StreamEnded):
            req = self._requests.get(event.stream_id)
            if req is not None:
                nursery.start_soon(self._handle, req)
        elif isinstance(event, h2.events.StreamReset):
            req = self._requests.pop(event.stream_id, None)
            if req is not None:
                req.cancel.cancel()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._window_open.set()
            self._window_open = trio.Event()

    # -- responses -------------------------------------------------------------------------

    async def _send_headers(
        self, req: _Request, status: int, *, end: bool = False, content_type: str = "application/json"
    ) -> None:
        self._conn.send_headers(
            req.stream_id, [(":status", str(status)), ("content-type", content_type)], end_stream=end
        )
        await self._flush()

    async def _send_data(self, req: _Request, data: bytes, *, end: bool = False) -> None:
        view = memoryview(data)
        while view:
            window = min(
                self._conn.local_flow_control_window(req.stream_id), self._conn.max_outbound_frame_size
            )
            if window <= 0:
                await self._window_open.wait()
                continue
            chunk, view = view[:window], view[window:]
            self._conn.send_data(req.stream_id, bytes(chunk), end_stream=end and not view)
            await self._flush()
        if end and not data:
            self._conn.end_stream(req.stream_id)
            await self._flush()

    async def _respond_json(self, req: _Request, status: int, body: dict[str, Any]) -> None:
        await self._send_headers(req, status)
        await self._send_data(req, json.dumps(body).encode(), end=True)

    async def _handle(self, req: _Request) -> None:
        method, path = req.headers.get(":method", ""), req.headers.get(":path", "")
        routes: dict[str, Callable[[_Request, dict[str, Any]], Awaitable[None]]] = {
            "/machine/register": self._register,
            "/machine/map": self._map,
            "/machine/set-dns": self._set_dns,
        }
        handler = routes.get(path.split("?")[0])
        with req.cancel:
            try:
                if handler is None or method != "POST":
                    log.info("%s: %s %s not served here (404)", self._who, method, path)
                    await self._respond_json(req, 404, {"error": f"{method} {path} not found"})
                    return
                try:
                    body = json.loads(req.body or b"{}")
                    if not isinstance(body, dict):
                        raise ValueError("not a JSON object")
                except ValueError as exc:
                    raise Refused(f"malformed request body: {exc}", 400) from None
                await handler(req, body)
            except Refused as exc:
                log.warning("%s: %s refused (%d): %s", self._who, path, exc.status, exc.reason)
                await self._respond_json(req, exc.status, mapresp.refusal(exc.reason))
            except keys.KeyError_ as exc:
                log.warning("%s: %s refused (400): %s", self._who, path, exc)
                await self._respond_json(req, 400, mapresp.refusal(str(exc)))
            except (trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.StreamClosedError):
                pass
        self._requests.pop(req.stream_id, None)

    async def _register(self, req: _Request, body: dict[str, Any]) -> None:
        reg = self._settings.registry
        auth = body.get("Auth") or {}
        hostinfo = body.get("Hostinfo") or {}
        if not isinstance(auth, dict) or not isinstance(hostinfo, dict):
            raise Refused("Auth and Hostinfo must be JSON objects", 400)
        if body.get("Followup"):
            raise Refused("interactive login is not supported here: use an auth key")
        node_key = keys.parse_public(body.get("NodeKey"), keys.NODE)
        old_node_key = _optional_key(body.get("OldNodeKey"), keys.NODE)
        try:
            node = reg.register(
                machine_key=self._machine,
                node_key=node_key,
                old_node_key=old_node_key,
                auth_key=auth.get("AuthKey") or auth.get("authKey"),
                hostinfo=hostinfo,
                expiry=_parse_time(body.get("Expiry")),
                capver=int(body.get("Version") or 0),
            )
        except Refused as exc:
            # Like Tailscale: a refused registration is a 200 whose Error says why. Go reports
            # it as a user-visible error; arkitekt-mesh raises ``Refused`` with the reason.
            log.warning("%s: registration of %r refused: %s", self._who, hostinfo.get("Hostname"), exc.reason)
            await self._respond_json(req, 200, mapresp.refusal(exc.reason))
            return
        await self._respond_json(req, 200, mapresp.register_response(reg, node))

    async def _set_dns(self, req: _Request, body: dict[str, Any]) -> None:
        reg = self._settings.registry
        node = reg.node_for_request(self._machine, keys.parse_public(body.get("NodeKey"), keys.NODE))
        try:
            reg.set_dns(node, name=body.get("Name"), rtype=body.get("Type"), value=body.get("Value"))
        except Refused as exc:
            log.warning("%s: set-dns refused (%d): %s", self._who, exc.status, exc.reason)
            await self._respond_json(req, exc.status, {"error": exc.reason})
            return
        await self._respond_json(req, 200, {})  # SetDNSResponse: the node needs a JSON body

    async def _map(self, req: _Request, body: dict[str, Any]) -> None:
        reg = self._settings.registry
        node = reg.node_for_request(self._machine, keys.parse_public(body.get("NodeKey"), keys.NODE))
        changed = self._apply_map_request(node, body)
        compress = body.get("Compress") == "zstd"
        stream = bool(body.get("Stream"))
        omit_peers = bool(body.get("OmitPeers"))
        if not stream and omit_peers:
            if changed:
                reg.bump(f"node {node.name} updated its endpoints")
            await self._send_headers(req, 200, end=True)
            return
        if not stream:
            if changed:
                reg.bump(f"node {node.name} updated its endpoints")
            frame = encode_map_frame(mapresp.map_response(reg, node, self._settings.derp), compress=compress)
            await self._send_headers(req, 200, content_type="application/octet-stream")
            await self._send_data(req, frame, end=True)
            return
        await self._stream_maps(req, node, compress)

    def _apply_map_request(self, node: Node, body: dict[str, Any]) -> bool:
        before = (node.disco_key, list(node.endpoints), node.home_derp, json.dumps(node.hostinfo))
        disco = _optional_key(body.get("DiscoKey"), keys.DISCO)
        if disco is not None:
            node.disco_key = disco
        endpoints = body.get("Endpoints")
        if isinstance(endpoints, list):
            node.endpoints = [e for e in endpoints if isinstance(e, str)]
        hostinfo = body.get("Hostinfo")
        if isinstance(hostinfo, dict) and hostinfo:
            node.hostinfo = hostinfo
            netinfo = hostinfo.get("NetInfo")
            if isinstance(netinfo, dict) and isinstance(netinfo.get("PreferredDERP"), int):
                node.home_derp = netinfo["PreferredDERP"]
        node.capver = int(body.get("Version") or node.capver)
        node.last_seen = time.time()
        after = (node.disco_key, list(node.endpoints), node.home_derp, json.dumps(node.hostinfo))
        return before != after

    async def _stream_maps(self, req: _Request, node: Node, compress: bool) -> None:
        reg, settings = self._settings.registry, self._settings
        await self._send_headers(req, 200, content_type="application/octet-stream")
        node.streams += 1
        reg.bump(f"node {node.name} online")
        log.info("%s: map stream open for %s", self._who, node.name)
        try:
            while node.id in reg.nodes and not node.logged_out:
                seen = reg.version
                response = mapresp.map_response(reg, node, settings.derp)
                await self._send_data(req, encode_map_frame(response, compress=compress))
                reg.sent_peers[node.name] = [p["ComputedName"] for p in response["Peers"]]
                while reg.version == seen:
                    with trio.move_on_after(settings.keepalive_interval):
                        await reg.changed()
                        continue
                    await self._send_data(req, encode_map_frame(mapresp.keep_alive(), compress=compress))
            # the node was removed or logged out: end its stream so it notices
            await self._send_data(req, b"", end=True)
        finally:
            node.streams -= 1
            node.last_seen = time.time()
            log.info("%s: map stream closed for %s", self._who, node.name)
            if node.id in reg.nodes:
                reg.bump(f"node {node.name} offline")
