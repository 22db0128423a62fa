"""pebble, the ACME test server, for the local tailnet: what Let's Encrypt is to Tailscale.

A node asks its control server to set the dns-01 TXT record (``POST /machine/set-dns``), the
tailnet's DNS responder (:mod:`.dns`) answers it, and pebble (Debian's ``pebble`` 2.4.0, started
here with ``-dnsserver`` pointing at that responder) validates it and issues the certificate.

* pebble's listener certificate comes from the tailnet's own throwaway CA (an IP SAN for the
  bind address), so one trust bundle covers the relay, the API and the ACME server;
* its root CA is new at every start; it is read from the management port (``/roots/0``);
* nodes need :meth:`AcmeServer.node_env`: ``TS_DEBUG_ACME_DIRECTORY_URL`` and ``SSL_CERT_FILE``
  (Go's roots: the tailnet CA, for pebble's listener, and pebble's root, so a node also trusts
  the certificates it stored).

Ports are fixed in pebble's config (it cannot report a port 0), so free ones are picked by
binding port 0 and closing, and the start is retried if one was taken meanwhile.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio
import trustme

log = logging.getLogger("tailnet.acme")

PEBBLE_ENV = {
    "PEBBLE_VA_NOSLEEP": "1",  # no random sleeps before validating
    "PEBBLE_WFE_NONCEREJECT": "0",  # never reject a good nonce (Go's ACME client would retry)
    "PEBBLE_AUTHZREUSE": "0",  # every order gets a fresh authorization, so set-dns is always called
}
START_TIMEOUT = 20.0
START_ATTEMPTS = 3
# pebble 2.4.0 logs each order it creates and each certificate it issues
ORDER_LINE = re.compile(r"Added order \"?([^\s\"]+)")
ISSUED_LINE = re.compile(r"Issued certificate serial (\S+)")


class PebbleUnavailable(RuntimeError):
    """pebble is not installed (Debian: ``apt-get install pebble``) or does not start."""


def pebble_binary() -> str:
    path = shutil.which("pebble") or ("/usr/bin/pebble" if os.path.exists("/usr/bin/pebble") else None)
    if path is None:
        raise PebbleUnavailable("pebble is not installed (Debian bookworm: apt-get install pebble)")
    return path


@dataclass(frozen=True)
class AcmeServer:
    directory_url: str
    management_url: str
    root_pem: bytes
    """pebble's root CA (PEM): what a client must trust to accept the issued certificates."""
    root_path: Path
    trust_path: Path
    """A PEM bundle: the tailnet CA (pebble's and the relay's listener) and pebble's root."""
    log_path: Path

    def node_env(self) -> dict[str, str]:
        """What a Tailscale node (a Caddy process) needs to get its certificates from pebble."""
        return {"TS_DEBUG_ACME_DIRECTORY_URL": self.directory_url, "SSL_CERT_FILE": str(self.trust_path)}

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def orders(self) -> list[str]:
        """Order IDs pebble created so far (from its log)."""
        return ORDER_LINE.findall(self.log_text())

    def issued(self) -> list[str]:
        """Serial numbers of the certificates pebble issued so far (from its log)."""
        return ISSUED_LINE.findall(self.log_text())


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def pebble_config(host: str, acme_port: int, management_port: int, cert: Path, key: Path) -> str:
    return json.dumps(
        {
            "pebble": {
                "listenAddress": f"{_url_host(host)}:{acme_port}",
                "managementListenAddress": f"{_url_host(host)}:{management_port}",
                "certificate": str(cert),
                "privateKey": str(key),
                # only dns-01 is used; nothing listens on these
                "httpPort": 5002,
                "tlsPort": 5001,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        },
        indent=2,
    )


def _read_tail(path: Path, size: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return ""


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _write_listener(workdir: Path, listener: trustme.LeafCert) -> tuple[Path, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = workdir / "pebble-listener.crt", workdir / "pebble-listener.key"
    listener.cert_chain_pems[0].write_to_path(str(cert_path))
    listener.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


async def _fetch_root(management_url: str, ca: trustme.CA, proc: trio.Process, log_path: Path) -> bytes:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with httpx.AsyncClient(verify=context, timeout=5) as client:
        while True:
            if proc.returncode is not None:
                tail = _read_tail(log_path)
                raise PebbleUnavailable(f"pebble exited {proc.returncode}:\n{tail}")
            try:
                r = await client.get(f"{management_url}/roots/0")
                if r.status_code == 200 and b"BEGIN CERTIFICATE" in r.content:
                    return r.content
            except httpx.TransportError:
                pass
            await trio.sleep(0.1)


async def serve_pebble(
    workdir: Path,
    host: str,
    dns_server: str,
    ca: trustme.CA,
    listener: trustme.LeafCert,
    *,
    task_status: trio.TaskStatus[AcmeServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run pebble on ``host`` (dns-01 lookups at ``dns_server``, ``host:port``) until cancelled."""
    binary = pebble_binary()
    cert_path, key_path = _write_listener(workdir, listener)
    log_path = workdir / "pebble.log"
    env = {**os.environ, **PEBBLE_ENV}
    for attempt in range(1, START_ATTEMPTS + 1):
        acme_port, management_port = _free_port(host), _free_port(host)
        config_path = _write(
            workdir / "pebble-config.json",
            pebble_config(host, acme_port, management_port, cert_path, key_path).encode(),
        )
        with log_path.open("ab") as out:
            proc = await trio.lowlevel.open_process(
                [binary, "-config", str(config_path), "-dnsserver", dns_server],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            management_url = f"https://{_url_host(host)}:{management_port}"
            try:
                with trio.fail_after(START_TIMEOUT):
                    root = await _fetch_root(management_url, ca, proc, log_path)
            except (PebbleUnavailable, trio.TooSlowError) as exc:
                if attempt == START_ATTEMPTS:
                    raise PebbleUnavailable(f"pebble did not start: {exc}") from None
                log.warning("pebble did not start (attempt %d): %s; retrying", attempt, exc)
                continue
            root_path = _write(workdir / "pebble-root.pem", root)
            trust_path = _write(workdir / "acme-trust.pem", ca.cert_pem.bytes() + root)
            server = AcmeServer(
                directory_url=f"https://{_url_host(host)}:{acme_port}/dir",
                management_url=management_url,
                root_pem=root,
                root_path=root_path,
                trust_path=trust_path,
                log_path=log_path,
            )
            log.info("pebble: directory %s, DNS %s", server.directory_url, dns_server)
            task_status.started(server)
            await proc.wait()
            raise PebbleUnavailable(f"pebble exited {proc.returncode}:\n{server.log_text()[-2000:]}")
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.terminate()
                    with trio.move_on_after(5):
                        await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
