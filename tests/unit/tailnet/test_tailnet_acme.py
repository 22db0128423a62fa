"""Certificates the way Tailscale issues them, on the in-process server (no real node): the map's
``CertDomains``, ``POST /machine/set-dns`` over the Noise channel (granted only for the asking
node's own ``_acme-challenge`` name), the DNS responder answering what was set, and
``python -m tests.tailnet --acme`` starting pebble."""

from __future__ import annotations

import json
import signal
import ssl
import struct
import subprocess
import sys
from typing import Any

import httpx
import pytest
import trio

from tests.tailnet import Tailnet, TailnetConfig, dns, keys, serve_tailnet
from tests.tailnet.acme import PebbleUnavailable, pebble_binary
from tests.tailnet.client import ControlClient, control_session
from tests.tailnet.keys import PrivateKey
from tests.tailnet.netns import REPO_ROOT

HOST = "127.0.0.1"
DOMAIN = "tail1234.ts.net"


@pytest.fixture
async def tailnet(nursery: trio.Nursery) -> Tailnet:
    config = TailnetConfig(host=HOST, domain=DOMAIN, dns=True, io_timeout=2)
    started: Tailnet = await nursery.start(serve_tailnet, config)
    return started


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def set_dns(c: ControlClient, node_key: PrivateKey, **fields: Any) -> tuple[int, Any]:
    body = {
        "Version": 130,
        "NodeKey": keys.format_public(node_key.public, keys.NODE),
        "Type": "TXT",
        "Value": "v" * 43,
        **fields,
    }
    status, raw = await c.post("/machine/set-dns", body)
    return status, json.loads(raw)


async def ask_txt(server: str, name: str) -> tuple[int, list[bytes]]:
    host, port = server.rsplit(":", 1)
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        query = struct.pack("!HHHHHH", 99, 0x0100, 1, 0, 0, 0) + dns.encode_name(name) + b"\x00\x10\x00\x01"
        await sock.sendto(query, (host, int(port)))
        reply, _ = await sock.recvfrom(4096)
    response = dns.parse_query(reply[:2] + b"\x00\x00" + reply[4:])  # the question, read back
    assert response.id == 99 and response.name == name
    rcode = reply[3] & 0xF
    values, offset = [], 12 + len(response.question)
    for _ in range(struct.unpack_from("!H", reply, 6)[0]):
        length = struct.unpack_from("!H", reply, offset + 10)[0]
        rdata = reply[offset + 12 : offset + 12 + length]
        values.append(rdata[1 : 1 + rdata[0]])
        offset += 12 + length
    return rcode, values


async def test_each_node_is_told_its_own_cert_domain(tailnet: Tailnet) -> None:
    key = PrivateKey.generate()
    with trio.fail_after(10):
        async with control_session(HOST, _port(tailnet.control_url)) as c:
            await c.register(key, tailnet.auth_key.key, "harmonia")
            maps = c.map_stream(key)
            first = await maps.__anext__()
            await maps.aclose()
    assert first["DNSConfig"]["CertDomains"] == [f"harmonia.{DOMAIN}"]
    assert first["Node"]["Name"] == f"harmonia.{DOMAIN}."


async def test_set_dns_for_the_own_name_is_answered_by_the_dns_responder(tailnet: Tailnet) -> None:
    key = PrivateKey.generate()
    assert tailnet.dns_server is not None
    name = f"_acme-challenge.harmonia.{DOMAIN}"
    with trio.fail_after(10):
        assert await ask_txt(tailnet.dns_server, name) == (dns.RCODE_NXDOMAIN, [])
        async with control_session(HOST, _port(tailnet.control_url)) as c:
            await c.register(key, tailnet.auth_key.key, "harmonia")
            assert await set_dns(c, key, Name=name, Value="token-1") == (200, {})
            assert await set_dns(c, key, Name=name.upper() + ".", Value="token-2") == (200, {})
        assert await ask_txt(tailnet.dns_server, name) == (dns.RCODE_OK, [b"token-1", b"token-2"])
    assert [(c.node, c.granted) for c in tailnet.registry.set_dns_calls] == [("harmonia", True)] * 2


@pytest.mark.parametrize(
    ("fields", "status", "says"),
    [
        ({"Name": f"_acme-challenge.other.{DOMAIN}"}, 403, "may only set '_acme-challenge.harmonia."),
        ({"Name": f"harmonia.{DOMAIN}"}, 403, "may only set"),
        ({"Name": f"_acme-challenge.harmonia.{DOMAIN}.evil.example"}, 403, "may only set"),
        ({"Name": f"_acme-challenge.harmonia.{DOMAIN}", "Type": "A"}, 400, "only TXT"),
        ({"Name": f"_acme-challenge.harmonia.{DOMAIN}", "Value": ""}, 400, "'Value'"),
        ({"Name": 7}, 400, "'Name'"),
    ],
)
async def test_set_dns_for_anything_else_is_refused_with_a_json_error(
    tailnet: Tailnet, fields: dict[str, Any], status: int, says: str
) -> None:
    key = PrivateKey.generate()
    assert tailnet.dns_server is not None
    with trio.fail_after(10):
        async with control_session(HOST, _port(tailnet.control_url)) as c:
            await c.register(key, tailnet.auth_key.key, "harmonia")
            got_status, body = await set_dns(c, key, **fields)
            assert got_status == status
            assert says in body["error"]
            # the session goes on: its own name is still granted
            assert (await set_dns(c, key, Name=f"_acme-challenge.harmonia.{DOMAIN}"))[0] == 200
        other = f"_acme-challenge.other.{DOMAIN}"
        assert await ask_txt(tailnet.dns_server, other) == (dns.RCODE_NXDOMAIN, [])
    assert [c.granted for c in tailnet.registry.set_dns_calls] == [False, True]


async def test_set_dns_for_an_unknown_node_key_is_refused(tailnet: Tailnet) -> None:
    with trio.fail_after(10):
        async with control_session(HOST, _port(tailnet.control_url)) as c:
            status, body = await set_dns(c, PrivateKey.generate(), Name=f"_acme-challenge.x.{DOMAIN}")
    assert status == 401 and "not registered" in body["Error"]
    assert tailnet.registry.set_dns_calls == []


def _pebble_or_skip() -> None:
    try:
        pebble_binary()
    except PebbleUnavailable as exc:
        pytest.skip(str(exc))


async def test_cli_with_acme_starts_pebble_and_prints_what_a_node_needs() -> None:
    _pebble_or_skip()
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.tailnet", "--acme", "--host", HOST],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(65536)
                assert chunk, "the CLI exited before printing its JSON line"
                line += chunk
        info = json.loads(line)
        assert info["domain"] == DOMAIN
        assert info["control_url"].startswith(f"http://{HOST}:") and info["auth_key"].startswith(
            "tskey-auth-"
        )
        directory = info["env"]["TS_DEBUG_ACME_DIRECTORY_URL"]
        assert directory == info["acme_directory_url"] and directory.startswith(f"https://{HOST}:")
        root = await trio.Path(info["ca_file"]).read_bytes()
        assert root.startswith(b"-----BEGIN CERTIFICATE-----")
        # SSL_CERT_FILE trusts pebble's listener (the ACME directory answers) and pebble's root
        bundle = info["env"]["SSL_CERT_FILE"]
        assert root in await trio.Path(bundle).read_bytes()
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=bundle), timeout=10) as client:
            with trio.fail_after(15):
                directory_doc = (await client.get(directory)).json()
        assert "newOrder" in directory_doc and "newAccount" in directory_doc
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await proc.wait() == 0
