"""The server in-process on loopback, driven by our Python client (no real nodes, no namespace):
the control protocol end to end, refusals of bad input, the DERP relay and the OAuth API."""

from __future__ import annotations

import base64
import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.parse

import httpx
import pytest
import trio

from tests.tailnet import Tailnet, TailnetConfig, keys, noise, serve_tailnet
from tests.tailnet.client import HttpError, control_session, derp_session, fetch_server_key
from tests.tailnet.keys import PrivateKey
from tests.tailnet.netns import REPO_ROOT
from tests.tailnet.wire import PEER_GONE_DISCONNECTED, PEER_GONE_NOT_HERE, DerpFrame, derp_frame

HOST = "127.0.0.1"


@pytest.fixture
async def tailnet(nursery: trio.Nursery) -> Tailnet:
    config = TailnetConfig(host=HOST, ephemeral_grace=0.3, map_keepalive=0.3, io_timeout=2)
    started: Tailnet = await nursery.start(serve_tailnet, config)
    return started


def _port(url: str) -> int:
    port = urllib.parse.urlsplit(url).port
    assert port is not None
    return port


def _ssl(tailnet: Tailnet) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    tailnet.ca.configure_trust(ctx)
    return ctx


async def _raw_http(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream(HOST, port)
    async with stream:
        await stream.send_all(request)
        out = bytearray()
        while chunk := await stream.receive_some(65536):
            out += chunk
        return bytes(out)


async def test_key_endpoint_closes_the_connection(tailnet: Tailnet) -> None:
    with trio.fail_after(5):
        reply = await _raw_http(_port(tailnet.control_url), b"GET /key?v=142 HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head.lower()
    assert json.loads(body)["publicKey"].startswith("mkey:")


async def test_register_and_stream_maps(tailnet: Tailnet) -> None:
    port = _port(tailnet.control_url)
    web_key, peer_key = PrivateKey.generate(), PrivateKey.generate()
    with trio.fail_after(10):
        async with control_session(HOST, port) as web:
            assert web.early_payload is not None
            assert web.early_payload["nodeKeyChallenge"].startswith("chalpub:")
            status, reg = await web.register(web_key, tailnet.auth_key.key, "web")
            assert status == 200 and reg["MachineAuthorized"] is True
            assert reg["User"]["LoginName"] == "tester@example.com"
            maps = web.map_stream(web_key)
            first = await maps.__anext__()
            assert first["Node"]["Name"] == "web.tailnet.test." and first["Peers"] == []
            async with control_session(HOST, port) as other:
                status, _ = await other.register(peer_key, tailnet.ephemeral_auth_key.key, "eph")
                assert status == 200
                other_maps = other.map_stream(peer_key, compress=False)
                assert (await other_maps.__anext__())["Peers"][0]["Name"] == "web.tailnet.test."
                async for message in maps:
                    if [p["Name"] for p in message.get("Peers", [])] == ["eph.tailnet.test."]:
                        break
                await other_maps.aclose()
            # the ephemeral node's session is gone: after the grace period it leaves web's peers
            async for message in maps:
                if message.get("Peers") == []:
                    break
            assert tailnet.node("eph") is None
            # keep-alives flow while nothing changes
            async for message in maps:
                if message.get("KeepAlive"):
                    break
            await maps.aclose()


async def test_endpoint_update_and_one_shot_map(tailnet: Tailnet) -> None:
    node_key = PrivateKey.generate()
    with trio.fail_after(10):
        async with control_session(HOST, _port(tailnet.control_url)) as c:
            await c.register(node_key, tailnet.auth_key.key, "n1")
            status, body = await c.post(
                "/machine/map",
                {
                    "NodeKey": keys.format_public(node_key.public, keys.NODE),
                    "OmitPeers": True,
                    "Stream": False,
                    "Endpoints": ["10.0.0.1:41641"],
                    "DiscoKey": keys.format_public(b"\x02" * 32, keys.DISCO),
                },
            )
            assert (status, body) == (200, b"")
            node = tailnet.node("n1")
            assert node is not None
            assert node.endpoints == ["10.0.0.1:41641"] and node.disco_key == b"\x02" * 32
            status, body = await c.post(
                "/machine/map", {"NodeKey": keys.format_public(node_key.public, keys.NODE), "Stream": False}
            )
            assert status == 200 and json.loads(body[4:])["Node"]["Name"] == "n1.tailnet.test."


async def test_bad_requests_are_refused_and_the_session_goes_on(
    tailnet: Tailnet, caplog: pytest.LogCaptureFixture
) -> None:
    key = PrivateKey.generate()
    with trio.fail_after(10):
        async with control_session(HOST, _port(tailnet.control_url)) as c:
            for auth, reason in [
                ("tskey-auth-bogus", "unknown"),
                (None, "no auth key"),
                (tailnet.registry.mint_key(expiry_seconds=-5).key, "expired"),
            ]:
                status, body = await c.register(key, auth, "x")
                assert status == 200 and reason in body["Error"]
                assert body["MachineAuthorized"] is False
            status, raw = await c.post("/machine/register", {"NodeKey": "nodekey:xyz"})
            assert status == 400 and "hex digits" in json.loads(raw)["Error"]
            status, _ = await c.post("/machine/nonsense", {})
            assert status == 404
            with pytest.raises(HttpError) as info:
                await c.map_stream(PrivateKey.generate()).__anext__()
            assert info.value.status == 401
            status, body = await c.register(key, tailnet.auth_key.key, "x")
            assert status == 200
    assert "registration of 'x' refused: invalid auth key: unknown" in caplog.text


async def test_garbage_handshakes_get_clean_refusals(
    tailnet: Tailnet, caplog: pytest.LogCaptureFixture
) -> None:
    port = _port(tailnet.control_url)
    upgrade = (
        b"POST /ts2021 HTTP/1.1\r\nHost: x\r\nUpgrade: tailscale-control-protocol\r\n"
        b"Connection: upgrade\r\nContent-Length: 0\r\n"
    )
    with trio.fail_after(10):
        reply = await _raw_http(port, upgrade + b"\r\n")
        assert reply.startswith(b"HTTP/1.1 400") and b"handshake header" in reply
        reply = await _raw_http(port, upgrade + b"X-Tailscale-Handshake: !!!\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400")
        junk = base64.b64encode(os.urandom(101))
        reply = await _raw_http(port, upgrade + b"X-Tailscale-Handshake: " + junk + b"\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 101")
        assert reply.split(b"\r\n\r\n", 1)[1] == noise.error_message("handshake failed")
        reply = await _raw_http(port, b"\x16\x03\x01 definitely not http\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400")
        # a valid handshake followed by an oversized record: the connection is closed
        server_key = await fetch_server_key(HOST, port)
        init = noise.initiate(PrivateKey.generate(), server_key, 130)
        stream = await trio.open_tcp_stream(HOST, port)
        async with stream:
            await stream.send_all(
                upgrade + b"X-Tailscale-Handshake: " + base64.b64encode(init.message) + b"\r\n\r\n"
            )
            await stream.send_all(b"\x04\xff\xff" + b"\x00" * 100)
            while await stream.receive_some(65536):
                pass
        # and the server still serves everyone else
        async with control_session(HOST, port) as c:
            status, _ = await c.register(PrivateKey.generate(), tailnet.auth_key.key, "ok")
            assert status == 200
    assert "Noise handshake refused" in caplog.text
    assert "bad Noise record" in caplog.text


async def test_http2_garbage_inside_noise_closes_only_that_session(
    tailnet: Tailnet, caplog: pytest.LogCaptureFixture
) -> None:
    port = _port(tailnet.control_url)
    with trio.fail_after(10):
        async with control_session(HOST, port) as c:
            # a well-formed Noise record whose plaintext is a DATA frame on stream 0
            await c.noise.send_all(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x00")
            await c.closed.wait()  # the server closed the connection
        async with control_session(HOST, port) as c:
            status, _ = await c.register(PrivateKey.generate(), tailnet.auth_key.key, "fine")
            assert status == 200
    assert "HTTP/2 protocol error" in caplog.text


async def test_oversized_api_body_is_refused(tailnet: Tailnet) -> None:
    port = _port(tailnet.control_url)
    body = b"x" * (1 << 20) + b"x"
    with trio.fail_after(10):
        reply = await _raw_http(
            port,
            b"POST /api/v2/oauth/token HTTP/1.1\r\nHost: x\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body,
        )
        assert reply.startswith(b"HTTP/1.1 413")
        reply = await _raw_http(port, b"GET /" + b"a" * 40000 + b" HTTP/1.1\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 431") or reply.startswith(b"HTTP/1.1 400")


async def test_derp_relays_pings_and_reports_peer_gone(tailnet: Tailnet) -> None:
    port, ctx = _port(tailnet.derp_url), _ssl(tailnet)
    a, b = PrivateKey.generate(), PrivateKey.generate()
    with trio.fail_after(10):
        async with derp_session(HOST, port, a, ctx) as da:
            assert da.server_key == tailnet.derp.public
            await da.send(b.public, b"early")
            assert await da.receive() == (DerpFrame.PEER_GONE, b.public + bytes([PEER_GONE_NOT_HERE]))
            async with derp_session(HOST, port, b, ctx) as db:
                await da.send(b.public, b"packet from a")
                assert await db.receive() == (DerpFrame.RECV_PACKET, a.public + b"packet from a")
                await db.stream.send_all(derp_frame(DerpFrame.PING, b"12345678"))
                assert await db.receive() == (DerpFrame.PONG, b"12345678")
                await db.send(a.public, b"reply from b")
                assert await da.receive() == (DerpFrame.RECV_PACKET, b.public + b"reply from b")
            # b sent to a, so a holds a route to b: it is told b is gone
            assert await da.receive() == (DerpFrame.PEER_GONE, b.public + bytes([PEER_GONE_DISCONNECTED]))
            # an oversized frame closes that connection only
            async with derp_session(HOST, port, b, ctx) as db:
                await db.stream.send_all(b"\x04\x7f\xff\xff\xff")
                with pytest.raises((trio.BrokenResourceError, Exception)):
                    await db.receive()
            await da.send(a.public, b"to myself")
            assert await da.receive() == (DerpFrame.RECV_PACKET, a.public + b"to myself")


async def test_derp_probe_keepalive_and_refusals(tailnet: Tailnet, caplog: pytest.LogCaptureFixture) -> None:
    ctx = _ssl(tailnet)
    async with httpx.AsyncClient(verify=ctx) as client:
        with trio.fail_after(10):
            # three requests on one kept-alive connection
            assert (await client.get(tailnet.derp_url + "/latency-check")).status_code == 200
            assert (await client.get(tailnet.derp_url)).status_code == 426
            assert (await client.get(tailnet.derp_url + "/latency-check")).status_code == 200
    with trio.fail_after(10):
        reply = await _raw_http(_port(tailnet.derp_url), b"GET / HTTP/1.1\r\n\r\n")
    assert reply == b""  # plain HTTP on the TLS port: closed
    assert "TLS handshake failed" in caplog.text


async def test_oauth_client_mints_keys_that_register(tailnet: Tailnet) -> None:
    api = tailnet.api_url
    async with httpx.AsyncClient(verify=_ssl(tailnet)) as http:
        with trio.fail_after(10):
            bad = await http.post(
                api + "oauth/token", data={"client_id": "x", "client_secret": "tskey-client-nope"}
            )
            assert bad.status_code == 401
            tok = await http.post(
                api + "oauth/token",
                data={
                    "client_id": tailnet.oauth_client.id,
                    "client_secret": tailnet.oauth_client.secret,
                    "grant_type": "client_credentials",
                },
            )
            assert tok.status_code == 200
            token = tok.json()["access_token"]
            assert tok.json()["expires_in"] > 60
            headers = {"Authorization": f"Bearer {token}"}
            untagged = await http.post(
                api + "tailnet/-/keys",
                headers=headers,
                json={"capabilities": {"devices": {"create": {"reusable": True}}}},
            )
            assert untagged.status_code == 400 and "tags" in untagged.json()["message"]
            made = await http.post(
                api + "tailnet/-/keys",
                headers=headers,
                json={
                    "capabilities": {
                        "devices": {"create": {"reusable": False, "ephemeral": True, "tags": ["tag:cache"]}}
                    },
                    "expirySeconds": 600,
                },
            )
            assert made.status_code == 200
            key = made.json()["key"]
            assert key.startswith("tskey-auth-") and made.json()["tags"] == ["tag:cache"]
            assert (await http.post(api + "tailnet/-/keys", json={})).status_code == 401
    with trio.fail_after(10):
        async with control_session(HOST, _port(tailnet.control_url)) as c:
            status, _ = await c.register(PrivateKey.generate(), key, "cache")
            assert status == 200
    node = tailnet.node("cache")
    assert node is not None
    assert node.tags == ("tag:cache",) and node.ephemeral
    async with httpx.AsyncClient() as http:
        with trio.fail_after(10):
            devices = await http.get(
                tailnet.control_url + "/api/v2/tailnet/-/devices",
                headers={"Authorization": f"Bearer {tailnet.api_key}"},
            )
    assert [d["hostname"] for d in devices.json()["devices"]] == ["cache"]


def _mint_with_tailscale_package(port: int, ca_pem: str, client_id: str, secret: str) -> str:
    """The PyPI ``tailscale`` client, its fixed https://api.tailscale.com/ pointed at us."""
    import asyncio
    import socket

    import aiohttp
    from aiohttp.abc import AbstractResolver, ResolveResult
    from tailscale import Tailscale

    class Loopback(AbstractResolver):
        async def resolve(
            self, host: str, port_: int = 0, family: int = socket.AF_INET
        ) -> list[ResolveResult]:
            return [
                ResolveResult(
                    hostname=host,
                    host=HOST,
                    port=port,
                    family=socket.AF_INET,
                    proto=0,
                    flags=socket.AI_NUMERICHOST,
                )
            ]

        async def close(self) -> None:
            pass

    async def main() -> str:
        ctx = ssl.create_default_context(cadata=ca_pem)
        connector = aiohttp.TCPConnector(resolver=Loopback(), ssl=ctx)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            Tailscale(oauth_client_id=client_id, oauth_client_secret=secret, session=session) as ts,
        ):
            made = await ts.create_key(reusable=True, tags=["tag:server"], preauthorized=True)
            return str(made.key)

    return asyncio.run(main())


async def test_tailscale_package_mints_a_key(tailnet: Tailnet) -> None:
    with trio.fail_after(20):
        key = await trio.to_thread.run_sync(
            _mint_with_tailscale_package,
            _port(tailnet.api_url),
            tailnet.ca_cert_pem.decode(),
            tailnet.oauth_client.id,
            tailnet.oauth_client.secret,
        )
        async with control_session(HOST, _port(tailnet.control_url)) as c:
            status, _ = await c.register(PrivateKey.generate(), key, "minted")
    minted = tailnet.node("minted")
    assert status == 200 and minted is not None and minted.tags == ("tag:server",)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_cli_prints_one_json_line_and_stops_on_signal(signum: signal.Signals) -> None:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.tailnet", "--host", HOST],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        with trio.fail_after(20):
            assert proc.stdout is not None
            line = bytearray()
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(1)
                assert chunk, "the CLI exited before printing its JSON line"
                line += chunk
            info = json.loads(line)
            assert info["control_url"].startswith(f"http://{HOST}:")
            assert info["auth_key"].startswith("tskey-auth-")
            server_key = await fetch_server_key(HOST, _port(info["control_url"]))
            assert len(server_key) == 32
            proc.send_signal(signum)
            assert await proc.wait() == 0
            rest = await proc.stdout.receive_some(65536)
            assert rest == b""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_local_tailnet_fixture(local_tailnet: Tailnet) -> None:
    with trio.fail_after(10):
        key = await fetch_server_key(HOST, _port(local_tailnet.control_url))
    assert len(key) == 32 and local_tailnet.config.host == HOST
