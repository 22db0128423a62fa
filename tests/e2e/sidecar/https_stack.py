"""The sidecar in its default mode — HTTPS with the tailnet's certificate — as a long-running
stack inside the test's network namespace, for ``tests/e2e/sidecar/test_https.py``.

    nix client ──https_proxy──► arkitekt-mesh node "builder" ──► https://harmonia.<domain>
                                (tagged, as a fleet's servers)
    (ip netns exec, on the host's store)                          │  sidecar node "harmonia"
                                                                  │  (certificate: pebble, dns-01)
    nix client ──https──► gateway Caddy (its own tsnet node) ─────┘
                                                                  ▼
                                                          harmonia-cache (namespace loopback)

The tailnet itself (control server with set-dns, DNS responder, pebble) is the module's
``acme_tailnet`` (``python -m tests.tailnet --acme``). :func:`https_stack` starts the cache, the
real ``harmonia-sidecar`` (the README's one command without ``--plaintext``), the builder node
with a TCP forward to ``harmonia.<domain>:443``, and the gateway; it reports what the test needs
(:func:`tests.tailnet.netns.report_ready`), then answers commands on a unix socket (unix
sockets are not namespaced, so the test on the host can call it) until its stdin closes:

* ``{"cmd": "tls", "sni": NAME}``: a TLS handshake with the sidecar's node through the forward,
  trusting only pebble's root: whether it succeeded, the error, the leaf certificate (PEM);
* ``{"cmd": "restart-sidecar"}``: SIGTERM the sidecar, start it again on the same state, wait
  until its node runs;
* ``{"cmd": "state"}``: the sidecar's pid and the certificate files in its node state;
* ``{"cmd": "intruder-set-dns", "name": NAME}``: another node (our Python control client,
  registered as "intruder") asks the control server to set ``NAME``'s TXT record: the status and
  body it got, and what the tailnet's DNS responder answers for ``NAME`` before and after.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import trio

from tests.e2e.caddy.scenarios import GATEWAY_PORT, gateway_global_options, render_gateway_cli
from tests.e2e.sidecar.scenarios import Sidecar, all_running
from tests.support.processes import stop_process
from tests.tailnet.netns import report_ready
from tests.tailnet.nodes import NODE_ENV, CaddyProcess, caddy, mesh_node

log = logging.getLogger("scenario.https")

NODE = "harmonia"
GATEWAY_NODE = "harmonia-gateway"
IO_TIMEOUT = 30.0


def sidecar_argv(work: Path, upstream: str) -> list[str]:
    """The README's one command, in the default mode (HTTPS, the tailnet's certificate)."""
    return [
        sys.executable,
        "-m",
        "sidecar",
        "--name",
        NODE,
        "--state-root",
        str(work / "state"),
        "--authkey-path",
        str(work / "authkey"),
        upstream,
    ]


async def start_sidecar(work: Path, upstream: str, env: dict[str, str]) -> Sidecar:
    log_path = work / "sidecar.log"
    with log_path.open("ab") as out:
        proc = await trio.lowlevel.open_process(
            sidecar_argv(work, upstream), env=env, stdout=out, stderr=subprocess.STDOUT
        )
    side = Sidecar(proc, str(work / "state" / "sidecar.sock"), log_path)
    with trio.fail_after(60):
        await side.wait(all_running({NODE}))
    return side


async def stop_sidecar(side: Sidecar) -> int | None:
    return await stop_process(side.proc)


def tls_probe(address: str, sni: str, ca_file: str, timeout: float = 90) -> dict[str, Any]:
    """A TLS handshake with ``address`` for ``sni``, trusting only ``ca_file``; then
    ``GET /nix-cache-info`` over it. Blocking (run it in a thread)."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=ca_file)
    context.set_alpn_protocols(["h2", "http/1.1"])  # as curl offers them
    out: dict[str, Any] = {"sni": sni, "ok": False}
    t0 = time.monotonic()
    try:
        with (
            socket.create_connection((host, int(port)), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=sni) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            out["leaf_pem"] = ssl.DER_cert_to_PEM_cert(der) if der else None
            out["tls_version"] = tls.version()
            out["alpn"] = tls.selected_alpn_protocol()
            tls.sendall(f"GET /nix-cache-info HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
            response = b""
            while chunk := tls.recv(65536):
                response += chunk
            out["response_head"] = response.split(b"\r\n", 1)[0].decode(errors="replace")
            out["ok"] = True
    except (OSError, ssl.SSLError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["seconds"] = round(time.monotonic() - t0, 2)
    return out


def cert_files(work: Path) -> list[str]:
    return sorted(str(p.relative_to(work)) for p in (work / "state").glob("**/certs/*") if p.is_file())


async def _until_gateway_ok(url: str, ca_file: Path, gateway: CaddyProcess) -> str:
    import httpx

    context = ssl.create_default_context(cafile=str(ca_file))
    async with httpx.AsyncClient(verify=context, timeout=15) as client:
        last: object = None
        while True:
            if gateway.process.returncode is not None:
                raise RuntimeError(f"gateway Caddy exited:\n{gateway.log_tail(60)}")
            try:
                r = await client.get(url)
                if r.status_code == 200:
                    return r.text
                last = r.status_code
            except httpx.TransportError as exc:
                last = exc
            log.info("GET %s not yet: %r", url, last)
            await trio.sleep(0.3)


async def _wait_for_file(path: Path) -> None:
    while not await trio.Path(path).exists():  # noqa: ASYNC110 - a file has no event to wait on
        await trio.sleep(0.1)


async def https_stack(
    workdir: str,
    host: str,
    control_url: str,
    auth_key: str,
    tagged_auth_key: str,
    domain: str,
    node_env: dict[str, str],
    ca_file: str,
) -> dict[str, Any]:
    from tests.support.cache_server import start_cache

    work = Path(workdir)
    name = f"{NODE}.{domain}"
    timings: dict[str, float] = {}
    t0 = time.monotonic()

    def mark(what: str) -> None:
        timings[what] = round(time.monotonic() - t0, 2)
        log.info("stack: %s at %.1fs", what, timings[what])

    cache_cm = start_cache(work / "cache", priority=60)
    cache = await trio.to_thread.run_sync(cache_cm.__enter__)
    (work / "authkey").write_text(auth_key + "\n")
    env = {**os.environ, **NODE_ENV, "TS_URL": control_url, **node_env}
    env.pop("TS_AUTHKEY", None)
    sides: list[Sidecar] = []
    try:
        sides.append(await start_sidecar(work, cache.url, env))
        mark("sidecar node running")
        async with mesh_node(
            # tagged, like a fleet's servers: served through the sidecar's 401 error route
            work / "builder",
            "builder",
            control_url=control_url,
            auth_key=tagged_auth_key,
        ) as builder:

            async def open_forward() -> str:
                return str(await builder.forward(name, 443))

            forward = await trio.to_thread.run_sync(lambda: asyncio.run(open_forward()))
            # the first handshake waits for the certificate: ACME order, set-dns, validation
            first = await trio.to_thread.run_sync(tls_probe, forward, name, ca_file)
            mark("first certificate")
            again = await trio.to_thread.run_sync(tls_probe, forward, name, ca_file)  # for comparison
            site = f"https://{host}:{GATEWAY_PORT}"
            # caddy-tailscale's transport cannot tell Caddy's active health checker to use https
            # (it implements no HealthCheckSchemeOverriderTransport): its probes would go to
            # port 443 in plain HTTP, get 400 and mark the only upstream down (503 for all)
            rendered = await render_gateway_cli(
                site, host, ["--no-active-health-checks"], upstream=f"https://{name}"
            )
            config = gateway_global_options(work, control_url) + rendered
            gw_dir = work / "gw"
            # the gateway's node dials https://harmonia.<domain>: Go trusts pebble's root
            # through SSL_CERT_FILE (transport tailscale ignores reverse_proxy's TLS settings)
            gw_env = {"TS_AUTHKEY": auth_key, "SSL_CERT_FILE": node_env["SSL_CERT_FILE"]}
            async with caddy(config, gw_dir, extra_env=gw_env) as gateway:
                gateway_ca = gw_dir / "data" / "caddy" / "pki" / "authorities" / "local" / "root.crt"
                with trio.fail_after(60):
                    await _wait_for_file(gateway_ca)
                    gateway_info = await _until_gateway_ok(f"{site}/nix-cache-info", gateway_ca, gateway)
                mark("gateway answers")
                listener = await _command_listener(work / "stack.sock")  # before the test may call
                report_ready(
                    {
                        "name": name,
                        "forward": forward,
                        "proxy_url": builder.proxy_url,
                        "cache_public_key": cache.public_key,
                        "cache_url": cache.url,
                        "first": first,
                        "second": again,
                        "cert_files": cert_files(work),
                        "gateway_url": site,
                        "gateway_ca": str(gateway_ca),
                        "gateway_cache_info": gateway_info,
                        "socket": str(work / "stack.sock"),
                        "timings": timings,
                    }
                )
                await _serve_commands(listener, work, cache.url, env, sides, forward, ca_file)
                seen: dict[str, Any] = {"gateway_log_panics": "panic" in gateway.log_text()}
    finally:
        for side in sides:
            await stop_sidecar(side)
        await trio.to_thread.run_sync(cache_cm.__exit__, None, None, None)
    seen["timings"] = timings
    return seen


async def _command_listener(path: Path) -> trio.SocketListener:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(4)
    return trio.SocketListener(sock)


async def _serve_commands(
    listener: trio.SocketListener,
    work: Path,
    upstream: str,
    env: dict[str, str],
    sides: list[Sidecar],
    forward: str,
    ca_file: str,
) -> None:
    path = work / "stack.sock"

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while not data.endswith(b"\n"):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            request = json.loads(data)
            try:
                answer = await _command(request, work, upstream, env, sides, forward, ca_file)
            except Exception as exc:  # the test sees the error, the stack keeps serving
                log.exception("command %r failed", request)
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            await stream.send_all(json.dumps(answer).encode() + b"\n")

    async def watch_stdin(cancel: trio.CancelScope) -> None:
        stdin = trio.lowlevel.FdStream(os.dup(0))
        async with stdin:
            while await stdin.receive_some(4096):
                pass
        cancel.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_stdin, nursery.cancel_scope)
        nursery.start_soon(trio.serve_listeners, handle, [listener])
    with suppress(OSError):
        path.unlink()


async def _command(
    request: dict[str, Any],
    work: Path,
    upstream: str,
    env: dict[str, str],
    sides: list[Sidecar],
    forward: str,
    ca_file: str,
) -> dict[str, Any]:
    cmd = request.get("cmd")
    if cmd == "tls":
        with trio.fail_after(120):
            result: dict[str, Any] = await trio.to_thread.run_sync(
                tls_probe, forward, str(request["sni"]), ca_file
            )
        return result
    if cmd == "restart-sidecar":
        t0 = time.monotonic()
        old = sides[-1]
        exit_code = await stop_sidecar(old)
        sides.append(await start_sidecar(work, upstream, env))
        # the node runs again, but the builder's WireGuard session with it must be made anew: a
        # connection opened before that stalls in SYN retransmits (seen: 30 s), so probe with
        # short timeouts until one gets through
        probes: list[dict[str, Any]] = []
        with trio.move_on_after(60):
            while not (probes and probes[-1]["ok"]):
                if probes:
                    await trio.sleep(0.5)
                probes.append(
                    await trio.to_thread.run_sync(tls_probe, forward, str(request["sni"]), ca_file, 6)
                )
        return {
            "old_exit": exit_code,
            "old_pid": old.proc.pid,
            "new_pid": sides[-1].proc.pid,
            "seconds": round(time.monotonic() - t0, 2),
            "probe": probes[-1] if probes else None,
            "failed_probes": [p.get("error") for p in probes[:-1]],
        }
    if cmd == "intruder-set-dns":
        with trio.fail_after(30):
            return await _intruder_set_dns(
                str(request["name"]), request["control_url"], request["auth_key"], request["dns_server"]
            )
    if cmd == "state":
        log_text = sides[-1].log_tail(100000)
        return {
            "pid": sides[-1].proc.pid,
            "cert_files": cert_files(work),
            "http_warnings": [
                line
                for line in log_text.splitlines()
                if '"level":"warn"' in line and '"logger":"http"' in line
            ],
        }
    return {"error": f"unknown command {cmd!r}"}


async def _dns_txt(server: str, name: str) -> list[str]:
    """The TXT values the tailnet's DNS responder gives for ``name`` (empty: none, or NXDOMAIN)."""
    from tests.tailnet import dns

    host, port = server.rsplit(":", 1)
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        query = (
            b"\x00\x07\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + dns.encode_name(name) + b"\x00\x10\x00\x01"
        )
        await sock.sendto(query, (host, int(port)))
        reply, _ = await sock.recvfrom(4096)
    values, offset = [], len(query)
    for _ in range(int.from_bytes(reply[6:8], "big")):
        length = int.from_bytes(reply[offset + 10 : offset + 12], "big")
        rdata = reply[offset + 12 : offset + 12 + length]
        values.append(rdata[1 : 1 + rdata[0]].decode())
        offset += 12 + length
    return values


async def _intruder_set_dns(name: str, control_url: str, auth_key: str, dns_server: str) -> dict[str, Any]:
    from tests.tailnet import keys
    from tests.tailnet.client import CAPVER, control_session
    from tests.tailnet.keys import PrivateKey

    host, port = control_url.split("//", 1)[1].rsplit(":", 1)
    node_key = PrivateKey.generate()
    before = await _dns_txt(dns_server, name)
    async with control_session(host, int(port)) as client:
        await client.register(node_key, auth_key, "intruder")
        status, body = await client.post(
            "/machine/set-dns",
            {
                "Version": CAPVER,
                "NodeKey": keys.format_public(node_key.public, keys.NODE),
                "Name": name,
                "Type": "TXT",
                "Value": "forged-" + "x" * 36,
            },
        )
    return {
        "status": status,
        "body": json.loads(body),
        "before": before,
        "after": await _dns_txt(dns_server, name),
    }


def call(socket_path: str, request: dict[str, Any], timeout: float = 150) -> dict[str, Any]:
    """From the test (on the host): send one command to the stack and return its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(socket_path)
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    return answer
