"""Push through the sidecar's node (issue 12's frontends), inside a test network namespace.

One sidecar, the whois directory on (the OAuth client's API credentials), three services in
front of one echo upstream: ``open`` (no ``push_allow``: every caller may push), ``users``
(``push_allow = ["tester@example.com"]``) and ``tagged`` (``push_allow = ["tag:server"]``). A
user's node (tester@example.com) and a tagged node (tag:server) PUT under ``/push`` to each.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Any

import h11
import trio

from tests.e2e.sidecar.scenarios import all_running, service_toml, sidecar_process
from tests.tailnet import Tailnet, TailnetConfig, serve_tailnet
from tests.tailnet.nodes import http_get_retrying, mesh_node
from tests.unit.sidecar.upstream import Echo

BODY = b"nar bytes " * 10_000


async def http_put(url: str, *, proxy: str, body: bytes) -> tuple[int, bytes]:
    """PUT ``url`` through an HTTP proxy; put it under ``trio.fail_after``."""
    parts, via = urllib.parse.urlsplit(url), urllib.parse.urlsplit(proxy)
    stream = await trio.open_tcp_stream(via.hostname or "", via.port or 80)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        head = h11.Request(
            method="PUT",
            target=url,
            headers=[("Host", parts.netloc), ("Connection", "close"), ("Content-Length", str(len(body)))],
        )
        await stream.send_all(
            conn.send(head) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        )
        status, answer = 0, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                answer += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, bytes(answer)


async def push_allow(workdir: str, host: str) -> dict[str, Any]:
    work = Path(workdir)
    seen: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        tailnet: Tailnet = await nursery.start(serve_tailnet, TailnetConfig(host=host))
        echo = Echo()
        port = await nursery.start(echo.serve)
        upstream = f"http://127.0.0.1:{port}"
        (work / "authkey").write_text(tailnet.auth_key.key + "\n")
        (work / "oauth").write_text(tailnet.oauth_client.secret + "\n")
        config = (
            f'state_dir = "{work / "state"}"\n'
            f'api_key_path = "{work / "oauth"}"\n'
            f'[defaults]\nauthkey_path = "{work / "authkey"}"\n'
            + service_toml("open", upstream)
            + service_toml("users", upstream, push_allow=["tester@example.com"])
            + service_toml("tagged", upstream, push_allow=["tag:server"])
        )
        async with sidecar_process(work, config, tailnet) as side:
            with trio.fail_after(90):
                await side.wait(all_running({"open", "users", "tagged"}))
            for name, key in (("laptop", tailnet.auth_key.key), ("server", tailnet.tagged_auth_key.key)):
                async with mesh_node(
                    work / name, name, control_url=tailnet.control_url, auth_key=key
                ) as node:
                    with trio.fail_after(90):
                        for service in ("open", "users", "tagged"):
                            await http_get_retrying(f"http://{service}/ready", proxy=node.proxy_url)
                        results: dict[str, Any] = {}
                        for service in ("open", "users", "tagged"):
                            before = len(echo.seen)
                            status, answer = await http_put(
                                f"http://{service}/push/nar/{name}.nar", proxy=node.proxy_url, body=BODY
                            )
                            arrived = [s for s in echo.seen[before:] if s["method"] == "PUT"]
                            results[service] = {
                                "status": status,
                                "answer": answer.decode(errors="replace")[:200],
                                "upstream_bytes": [s["body_bytes"] for s in arrived],
                            }
                            if status == 200:
                                results[service]["seen_by_upstream"] = json.loads(answer)["path"]
                    seen[name] = results
        nursery.cancel_scope.cancel()
    return seen
