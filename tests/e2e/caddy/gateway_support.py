"""Real Debian Caddy on loopback in front of an upstream, and a tiny echo upstream of our own.

- :func:`run_gateway` renders a :class:`~caddy.model.GatewaySite` with ``harmonia-caddy``'s
  renderer, adds the test's global options (admin off, data/config dirs under tmp, no trust-store
  install, no HTTP redirect listener) and runs ``caddy run`` until the block ends. The site is
  ``https://127.0.0.1:<port>`` with ``tls internal`` and ``bind 127.0.0.1``; the client trusts
  Caddy's local CA root (``gateway.ca_file``, also for ``NIX_SSL_CERT_FILE``).
- :class:`EchoUpstream` records every request it gets and answers like a tiny cache: a
  ``/nix-cache-info`` for health checks, ``/health`` echoing the request headers as JSON,
  narinfo-like text, NAR-like bytes, a slow NAR for the streaming check, a pre-encoded narinfo.
- :func:`refused_address` holds a loopback port that refuses connections (bound, not listening).

Caddy cannot be given port 0 and report the port back, so the gateway port is picked by binding
port 0 and closing (tolerated for Caddy only) and the start is retried if the port was taken.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from caddy.binaries import debian_caddy
from caddy.caddyfile import render_gateway
from caddy.model import GatewaySite, Upstream
from caddy.policy import Policy

IO_TIMEOUT = 20.0
NARINFO_BODY = (
    "StorePath: /nix/store/"
    + "a" * 32
    + "-x\n"
    + "References: "
    + " ".join(f"{i:032d}-dep-{i}" for i in range(40))
    + "\n"
).encode()
NAR_BODY = b"".join(b"nix-archive-1 %08d padding padding padding\n" % i for i in range(8000))
PRE_ENCODED_TEXT = b"StorePath: /nix/store/" + b"b" * 32 + b"-pre-encoded\n" * 60
HASH = "0" * 32


# ------------------------------------------------------------------------------------------
# echo upstream


@dataclass
class Seen:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body_size: int


@dataclass
class EchoUpstream:
    server: _TrackingServer
    thread: threading.Thread
    seen: list[Seen] = field(default_factory=list)
    release_slow: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        return [s.path for s in list(self.seen)]

    def stop(self) -> None:
        """Down for real: no listener and no kept-alive connection keeps answering."""
        self.release_slow.set()
        self.server.shutdown()
        self.server.server_close()
        for conn in list(self.server.connections):
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.thread.join(IO_TIMEOUT)


def _handler(upstream_ref: list[EchoUpstream]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = IO_TIMEOUT

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _record(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            upstream_ref[0].seen.append(Seen(self.command, self.path, list(self.headers.items()), len(body)))
            return body

        def _send(self, status: int, body: bytes, ctype: str, **extra: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for name, value in extra.items():
                self.send_header(name.replace("_", "-"), value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            self._record()
            path = self.path.split("?", 1)[0]
            if path == "/nix-cache-info":
                self._send(
                    200, b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 60\n", "text/x-nix-cache-info"
                )
            elif path == "/health":
                body = json.dumps(
                    {"method": self.command, "path": self.path, "headers": list(self.headers.items())}
                ).encode()
                self._send(200, body, "application/json")
            elif path == f"/{'e' * 32}.narinfo":
                self._send(
                    200,
                    gzip.compress(PRE_ENCODED_TEXT, mtime=0),
                    "text/x-nix-narinfo",
                    Content_Encoding="gzip",
                )
            elif path.endswith(".narinfo") or path.endswith(".ls"):
                self._send(200, NARINFO_BODY, "text/x-nix-narinfo")
            elif path == "/nar/slow.nar":
                self.send_response(200)
                self.send_header("Content-Type", "application/x-nix-nar")
                self.send_header("Content-Length", str(len(NAR_BODY)))
                self.end_headers()
                self.wfile.write(NAR_BODY[:1000])
                self.wfile.flush()
                upstream_ref[0].release_slow.wait(IO_TIMEOUT)
                self.wfile.write(NAR_BODY[1000:])
            elif path.startswith("/nar/"):
                self._send(200, NAR_BODY, "application/x-nix-nar")
            else:
                self._send(200, b"upstream answered " + path.encode(), "text/plain")

        do_HEAD = do_GET

        def do_PUT(self) -> None:
            body = self._record()
            self._send(201, b"stored %d\n" % len(body), "text/plain")

        do_POST = do_PUT

    return Handler


class _TrackingServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.connections: list[socket.socket] = []
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections.append(request)
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the gateway hung up (a cut upload, a stopped test): expected
        super().handle_error(request, client_address)


@contextmanager
def echo_upstream(port: int = 0) -> Iterator[EchoUpstream]:
    ref: list[EchoUpstream] = []
    server = _TrackingServer(("127.0.0.1", port), _handler(ref))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    upstream = EchoUpstream(server, thread)
    ref.append(upstream)
    thread.start()
    try:
        yield upstream
    finally:
        upstream.stop()


@contextmanager
def refused_address() -> Iterator[str]:
    """``127.0.0.1:<port>`` that refuses connections for as long as the block runs."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connect() gets RST
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


# ------------------------------------------------------------------------------------------
# the gateway


@dataclass
class Gateway:
    port: int
    root: Path
    proc: subprocess.Popen[bytes]
    caddyfile: str

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.root / "data" / "caddy" / "pki" / "authorities" / "local" / "root.crt"

    @property
    def access_log(self) -> Path:
        return self.root / "access.log"

    @property
    def caddy_log(self) -> str:
        return (self.root / "caddy.log").read_text(errors="replace")

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def connection(self, timeout: float = IO_TIMEOUT) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.ssl_context(), timeout=timeout
        )

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        timeout: float = IO_TIMEOUT,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = self.connection(timeout)
        try:
            # like Nix 2.8: no Accept-Encoding unless the test gives one
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            data = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        finally:
            conn.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gateway_caddyfile(site: GatewaySite, root: Path) -> str:
    options = "\n".join(
        [
            "{",
            "\tadmin off",
            "\tskip_install_trust",
            "\tauto_https disable_redirects",
            "}",
            "",
        ]
    )
    return options + render_gateway(site)


def _ready(port: int, ca_file: Path) -> bool:
    if not ca_file.exists():
        return False
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1"),
        ):
            return True
    except (OSError, ssl.SSLError):
        return False


@contextmanager
def run_gateway(
    tmp_path: Path,
    upstreams: list[str] | list[Upstream],
    policy: Policy | None = None,
    *,
    timeout: float = 30,
) -> Iterator[Gateway]:
    """Debian's Caddy serving the rendered gateway on https://127.0.0.1:<port> until the block ends."""
    binary = debian_caddy()
    if binary is None:
        raise RuntimeError("Debian's Caddy is not installed (apt-get install caddy)")
    ups = tuple(u if isinstance(u, Upstream) else Upstream(u) for u in upstreams)
    last_error = ""
    for attempt in range(3):
        root = tmp_path / f"gateway-{attempt}"
        root.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        site = GatewaySite(
            site=f"https://127.0.0.1:{port}",
            upstreams=ups,
            policy=policy or Policy(),
            tls="internal",
            bind=("127.0.0.1",),
            log_output=str(root / "access.log"),
        )
        text = gateway_caddyfile(site, root)
        (root / "Caddyfile").write_text(text)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CADDY")}
        env.update(HOME=str(root), XDG_DATA_HOME=str(root / "data"), XDG_CONFIG_HOME=str(root / "config"))
        with (root / "caddy.log").open("wb") as log:
            proc = subprocess.Popen(
                [str(binary), "run", "--config", str(root / "Caddyfile"), "--adapter", "caddyfile"],
                cwd=root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        gateway = Gateway(port, root, proc, text)
        try:
            deadline = time.monotonic() + timeout
            while proc.poll() is None and not _ready(port, gateway.ca_file):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Caddy not ready after {timeout}s:\n{gateway.caddy_log}")
                time.sleep(0.05)
            if proc.poll() is not None:
                last_error = gateway.caddy_log
                if "address already in use" in last_error:
                    continue  # the picked port was taken in between: pick another
                raise RuntimeError(f"Caddy exited {proc.returncode}:\n{last_error}")
            yield gateway
            return
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
    raise RuntimeError(f"Caddy could not bind a port in 3 attempts:\n{last_error}")


def wait_for(predicate: Any, timeout: float, interval: float = 0.25) -> Any:
    """Poll ``predicate`` until it returns something truthy; its last value otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# ------------------------------------------------------------------------------------------
# the engine's JSON (what the sidecar compiles), on a plain loopback listener


@dataclass
class Engine:
    port: int
    root: Path
    proc: subprocess.Popen[bytes]

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        timeout: float = IO_TIMEOUT,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            data = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        finally:
            conn.close()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


@contextmanager
def run_engine(
    tmp_path: Path, binary: Path, server: dict[str, Any], *, timeout: float = 30
) -> Iterator[Engine]:
    """Caddy running ``{"apps": {"http": {"servers": {"engine": server}}}}`` on 127.0.0.1:<port>."""
    last_error = ""
    for attempt in range(3):
        root = tmp_path / f"engine-{attempt}"
        root.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        config = {
            "admin": {"disabled": True, "config": {"persist": False}},
            "apps": {
                "http": {
                    "servers": {
                        "engine": {
                            **server,
                            "listen": [f"127.0.0.1:{port}"],
                            "automatic_https": {"disable": True},
                        }
                    }
                }
            },
        }
        (root / "config.json").write_text(json.dumps(config, indent=2))
        env = {k: v for k, v in os.environ.items() if not k.startswith("CADDY")}
        env.update(HOME=str(root), XDG_DATA_HOME=str(root / "data"), XDG_CONFIG_HOME=str(root / "config"))
        with (root / "caddy.log").open("wb") as log:
            proc = subprocess.Popen(
                [str(binary), "run", "--config", str(root / "config.json")],
                cwd=root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + timeout
            while proc.poll() is None and not _accepts(port):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Caddy not ready after {timeout}s")
                time.sleep(0.05)
            if proc.poll() is not None:
                last_error = (root / "caddy.log").read_text(errors="replace")
                if "address already in use" in last_error:
                    continue
                raise RuntimeError(f"Caddy exited {proc.returncode}:\n{last_error}")
            yield Engine(port, root, proc)
            return
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
    raise RuntimeError(f"Caddy could not bind a port in 3 attempts:\n{last_error}")
