"""The local tailnet's device list (``GET /api/v2/tailnet/-/devices``), in the real API's shape and
read by the real PyPI ``tailscale`` client (server in-process on loopback, nodes registered by
our Python client; no real node, no namespace)."""

from __future__ import annotations

import ssl
import urllib.parse
from typing import Any

import httpx
import pytest
import trio

from tests.tailnet import Tailnet, TailnetConfig, serve_tailnet
from tests.tailnet.client import control_session
from tests.tailnet.keys import PrivateKey

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


async def _register_two(tailnet: Tailnet) -> None:
    # a node is its machine key, i.e. its control session: one session each
    with trio.fail_after(10):
        for key, hostname in ((tailnet.auth_key.key, "laptop"), (tailnet.tagged_auth_key.key, "builder")):
            async with control_session(HOST, _port(tailnet.control_url)) as c:
                status, _ = await c.register(PrivateKey.generate(), key, hostname)
                assert status == 200


async def test_devices_in_the_real_api_shape(tailnet: Tailnet) -> None:
    await _register_two(tailnet)
    ctx = ssl.create_default_context()
    tailnet.ca.configure_trust(ctx)
    async with httpx.AsyncClient(verify=ctx) as http:
        with trio.fail_after(10):
            listed = await http.get(
                tailnet.api_url + "tailnet/-/devices?fields=all",
                headers={"Authorization": f"Bearer {tailnet.api_key}"},
            )
            refused = await http.get(tailnet.api_url + "tailnet/-/devices")
    assert refused.status_code == 401
    assert listed.status_code == 200
    devices = {d["hostname"]: d for d in listed.json()["devices"]}
    assert set(devices) == {"laptop", "builder"}
    laptop, builder = devices["laptop"], devices["builder"]
    for name, device in devices.items():
        node = tailnet.node(name)
        assert node is not None
        assert device["id"] == str(node.id)
        assert device["nodeId"].startswith("n") and device["nodeId"].endswith("CNTRL")
        assert device["name"] == f"{name}.{tailnet.config.domain}"  # the FQDN, no trailing dot
        assert device["addresses"] == [node.ipv4, node.ipv6]
        assert device["authorized"] is True
    assert builder["tags"] == ["tag:server"]
    assert "tags" not in laptop  # the real API leaves it out for untagged devices
    assert laptop["user"] == "tester@example.com"
    assert laptop["id"] != builder["id"] and laptop["nodeId"] != builder["nodeId"]


def _devices_with_tailscale_package(port: int, ca_pem: str, api_key: str) -> dict[str, Any]:
    """The PyPI ``tailscale`` client's ``devices()``, its fixed api.tailscale.com pointed at us."""
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

    async def main() -> dict[str, Any]:
        ctx = ssl.create_default_context(cadata=ca_pem)
        connector = aiohttp.TCPConnector(resolver=Loopback(), ssl=ctx)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            Tailscale(api_key=api_key, session=session) as ts,
        ):
            return {
                d.hostname: (d.name, d.node_id, list(d.addresses), list(d.tags), d.user)
                for d in (await ts.devices()).values()
            }

    return asyncio.run(main())


async def test_the_tailscale_package_reads_the_device_list(tailnet: Tailnet) -> None:
    await _register_two(tailnet)
    with trio.fail_after(20):
        seen = await trio.to_thread.run_sync(
            _devices_with_tailscale_package,
            _port(tailnet.api_url),
            tailnet.ca_cert_pem.decode(),
            tailnet.api_key,
        )
    builder = tailnet.node("builder")
    assert builder is not None
    name, node_id, addresses, tags, _ = seen["builder"]
    assert name == f"builder.{tailnet.config.domain}"
    assert node_id.endswith("CNTRL")
    assert addresses == [builder.ipv4, builder.ipv6]
    assert tags == ["tag:server"]
    assert seen["laptop"][3] == []
    assert seen["laptop"][4] == "tester@example.com"
