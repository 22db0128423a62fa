"""The server as a service: CLI, keys, config errors, systemd protocols, workers, TLS, shutdown."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trustme

from tests.support.cache_server import generate_key, render_toml, start_cache
from tests.support.fixtures import Fixtures

pytestmark = pytest.mark.e2e
CLI = [sys.executable, "-m", "cache"]


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def test_key_generate_and_public(tmp_path: Path) -> None:
    out = cli(
        "key",
        "generate",
        "harmonia-raider-1",
        "--secret-file",
        str(tmp_path / "sk"),
        "--public-file",
        str(tmp_path / "pk"),
    )
    assert out.returncode == 0, out.stderr
    public = (tmp_path / "pk").read_text()
    assert public.startswith("harmonia-raider-1:") and out.stdout.strip() == public
    assert (tmp_path / "sk").stat().st_mode & 0o077 == 0
    assert cli("key", "public", str(tmp_path / "sk")).stdout.strip() == public
    again = cli(
        "key", "generate", "x", "--secret-file", str(tmp_path / "sk"), "--public-file", str(tmp_path / "p2")
    )
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr


def test_nix_generated_key_is_accepted(tmp_path: Path) -> None:
    subprocess.run(
        ["nix-store", "--generate-binary-cache-key", "nixkey-1", str(tmp_path / "sk"), str(tmp_path / "pk")],
        check=True,
        timeout=30,
    )
    (tmp_path / "sk").chmod(0o600)
    assert cli("key", "public", str(tmp_path / "sk")).stdout.strip() == (tmp_path / "pk").read_text().strip()


def test_world_readable_secret_key_is_refused(tmp_path: Path) -> None:
    secret, _ = generate_key(tmp_path)
    secret.chmod(0o644)
    config = tmp_path / "c.toml"
    config.write_text(render_toml({"bind": "127.0.0.1:0", "sign_key_paths": [str(secret)]}))
    out = cli("--config", str(config))
    assert out.returncode == 2
    assert "readable by group or others" in out.stderr and f"chmod 600 {secret}" in out.stderr
    assert secret.read_text().split(":")[1] not in out.stderr + out.stdout


def test_config_errors_listed_at_once(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('bind = "nowhere"\nworkers = -1\nprioriti = 3\n')
    out = cli("--config", str(config))
    assert out.returncode == 2
    for key in ("bind:", "workers:", "prioriti: unknown key"):
        assert key in out.stderr


def test_check_config_through_config_file_env(tmp_path: Path) -> None:
    secret, _ = generate_key(tmp_path)
    config = tmp_path / "c.toml"
    config.write_text(render_toml({"priority": 60}))
    out = cli("check-config", env={"CONFIG_FILE": str(config), "SIGN_KEY_PATHS": str(secret)})
    assert out.returncode == 0, out.stderr
    assert "1 signing key(s): test-cache-1" in out.stdout


def test_healthcheck(tmp_path: Path, nix_daemon_env: dict[str, str]) -> None:
    with start_cache(tmp_path) as cache:
        ok = subprocess.run(
            [sys.executable, "-m", "cache.healthcheck", f"{cache.url}/nix-cache-info"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ok.returncode == 0, ok.stderr
        wrong = subprocess.run(
            [sys.executable, "-m", "cache.healthcheck", f"{cache.url}/version"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert wrong.returncode == 1 and "not a Nix binary cache" in wrong.stderr
    down = subprocess.run(
        [sys.executable, "-m", "cache.healthcheck", cache.url + "/nix-cache-info"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert down.returncode == 1
    assert down.stderr.startswith("unhealthy:") and len(down.stderr.strip().splitlines()) == 1


def test_sd_notify_ready_and_watchdog(tmp_path: Path, nix_daemon_env: dict[str, str]) -> None:
    notify_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.settimeout(20)
    messages: list[str] = []
    env = {**os.environ, "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "400000"}
    try:
        with start_cache(tmp_path, env=env):
            deadline = time.monotonic() + 20
            while not any("WATCHDOG=1" in m for m in messages) and time.monotonic() < deadline:
                messages.append(sock.recv(4096).decode())
    finally:
        sock.close()
    assert any(m.startswith("READY=1") for m in messages)
    assert any("STATUS=Serving on http://127.0.0.1:" in m for m in messages)
    assert any("WATCHDOG=1" in m for m in messages)


def test_socket_activation(tmp_path: Path, store_fixtures: Fixtures) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    secret, _ = generate_key(tmp_path)
    config = tmp_path / "c.toml"
    config.write_text(render_toml({"bind": "127.0.0.1:1", "workers": 1, "sign_key_paths": [str(secret)]}))
    # systemd's protocol: the socket is fd 3 and LISTEN_PID names the service's own pid
    launcher = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
        "os.environ['LISTEN_FDS'] = '1'; os.execv(sys.executable, [sys.executable, '-m', 'cache', "
        "'--config', sys.argv[2]])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, str(listener.fileno()), str(config)],
        pass_fds=[listener.fileno()],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        resp = httpx.get(f"http://127.0.0.1:{port}/nix-cache-info", timeout=20)
        assert resp.status_code == 200 and "StoreDir" in resp.text
    finally:
        proc.terminate()
        proc.wait(20)
        assert proc.stderr is not None
        proc.stderr.close()
        listener.close()


def test_workers_share_the_port_and_metrics(tmp_path: Path, store_fixtures: Fixtures) -> None:
    with start_cache(tmp_path, workers=2) as cache:
        with httpx.Client(base_url=cache.url, timeout=20) as client:
            for _ in range(40):
                assert client.get("/nix-cache-info", headers={"Connection": "close"}).status_code == 200
            text = client.get("/metrics").text
        children = subprocess.run(["pgrep", "-P", str(cache.proc.pid)], capture_output=True, text=True)
        assert len(children.stdout.split()) == 2
        line = next(
            x for x in text.splitlines() if x.startswith('harmonia_requests_total{route="nix-cache-info"')
        )
        assert line.endswith(" 40")
        assert "harmonia_workers 2" in text


def test_sigterm_lets_a_running_transfer_finish(tmp_path: Path, store_fixtures: Fixtures) -> None:
    with start_cache(tmp_path) as cache:
        h = Path(store_fixtures.big).name[:32]
        text = httpx.get(f"{cache.url}/{h}.narinfo", timeout=20).text
        narhash = text.split("NarHash: sha256:")[1][:52]
        size = int(text.split("NarSize: ")[1].split()[0])
        received = 0
        with httpx.stream(
            "GET",
            f"{cache.url}/nar/{narhash}.nar?hash={h}",
            timeout=60,
            headers={"Accept-Encoding": "identity"},
        ) as resp:
            for chunk in resp.iter_raw(1 << 16):
                if received == 0:
                    cache.proc.send_signal(signal.SIGTERM)
                received += len(chunk)
                time.sleep(0.0005) if received < (1 << 20) else None
        assert received == size
        assert cache.proc.wait(20) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{cache.url}/nix-cache-info", timeout=5)


def test_unix_socket_bind(tmp_path: Path, nix_daemon_env: dict[str, str]) -> None:
    path = tmp_path / "cache.sock"
    with start_cache(tmp_path, bind=f"unix:{path}") as cache:
        assert cache.url == f"http+unix://{path}"
        transport = httpx.HTTPTransport(uds=str(path))
        with httpx.Client(transport=transport, base_url="http://cache", timeout=20) as client:
            assert "Priority:" in client.get("/nix-cache-info").text


def test_tls_with_alpn_h2_and_http11(
    tmp_path: Path, store_fixtures: Fixtures, nix_daemon_env: dict[str, str]
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "chain.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    with start_cache(
        tmp_path, tls_cert_path=str(tmp_path / "chain.pem"), tls_key_path=str(tmp_path / "key.pem")
    ) as cache:
        assert cache.url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        with httpx.Client(verify=ctx, http2=True, timeout=20) as h2:
            resp = h2.get(f"{cache.url}/nix-cache-info")
            assert resp.http_version == "HTTP/2" and "StoreDir" in resp.text
        with httpx.Client(verify=ctx, timeout=20, headers={"Accept-Encoding": "identity"}) as h1:
            resp = h1.get(f"{cache.url}/nix-cache-info")
            assert resp.http_version == "HTTP/1.1" and "StoreDir" in resp.text
        env = dict(nix_daemon_env, NIX_SSL_CERT_FILE=str(tmp_path / "ca.pem"))
        from tests.support.nix import nix_env, run

        client_env = nix_env(
            tmp_path / "xdg",
            f"trusted-public-keys = {cache.public_key}\n",
            NIX_SSL_CERT_FILE=env["NIX_SSL_CERT_FILE"],
        )
        run(
            ["nix", "copy", "--from", cache.url, "--to", str(tmp_path / "client"), store_fixtures.tree],
            env=client_env,
        )


def test_real_store_elsewhere(
    tmp_path: Path, store_fixtures: Fixtures, nix_daemon_env: dict[str, str]
) -> None:
    """virtual_nix_store / real_nix_store: the files are read from where the store really is."""
    from tests.support.nix import dump

    real = tmp_path / "mnt-store"
    real.mkdir()
    subprocess.run(["cp", "-a", store_fixtures.tree, str(real)], check=True, timeout=60)
    with (
        start_cache(tmp_path / "srv", virtual_nix_store="/nix/store", real_nix_store=str(real)) as cache,
        httpx.Client(base_url=cache.url, timeout=30, headers={"Accept-Encoding": "identity"}) as client,
    ):
        h = Path(store_fixtures.tree).name[:32]
        text = client.get(f"/{h}.narinfo").text
        assert f"StorePath: {store_fixtures.tree}" in text
        narhash = text.split("NarHash: sha256:")[1][:52]
        assert client.get(f"/nar/{narhash}.nar?hash={h}").content == dump(store_fixtures.tree, nix_daemon_env)
        # valid in the database but not under the real store: not served
        assert client.get(f"/{Path(store_fixtures.dep).name[:32]}.narinfo").status_code == 404


def test_connection_limit_queues_instead_of_failing(tmp_path: Path, nix_daemon_env: dict[str, str]) -> None:
    with start_cache(tmp_path, max_connections=1) as cache:
        host, port = cache.hostport.rsplit(":", 1)
        first = socket.create_connection((host, int(port)), timeout=10)
        try:
            first.sendall(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n")
            assert first.recv(4096).startswith(b"HTTP/1.1 200")
            # the first connection is kept alive: a second one waits for its slot
            with pytest.raises(httpx.ReadTimeout):
                httpx.get(f"{cache.url}/nix-cache-info", timeout=1.5)
        finally:
            first.close()
        assert httpx.get(f"{cache.url}/nix-cache-info", timeout=10).status_code == 200


def test_idle_keepalive_connections_do_not_delay_shutdown(
    tmp_path: Path, nix_daemon_env: dict[str, str]
) -> None:
    with start_cache(tmp_path) as cache:
        host, port = cache.hostport.rsplit(":", 1)
        idle = socket.create_connection((host, int(port)), timeout=10)
        silent = socket.create_connection((host, int(port)), timeout=10)
        try:
            idle.sendall(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n")
            assert idle.recv(4096).startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            cache.proc.send_signal(signal.SIGTERM)
            assert cache.proc.wait(10) == 0
            assert time.monotonic() - started < 3
            assert idle.recv(4096) == b""  # closed cleanly, not reset
        finally:
            idle.close()
            silent.close()


class DaemonSocketRelay:
    """A unix-socket relay in front of the real nix-daemon that can drop every connection at once:
    what the cache's pooled daemon connections see when the daemon restarts."""

    def __init__(self, path: Path, target: str = "/nix/var/nix/daemon-socket/socket") -> None:
        self.path = path
        self.target = target
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(64)
        self.accepted = 0
        import threading

        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            self.pairs.append((client, upstream))
            self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def drop_all(self) -> None:
        for a, b in self.pairs:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        self.pairs.clear()

    def close(self) -> None:
        self.drop_all()
        self.listener.close()


def test_daemon_backend_survives_a_daemon_restart(
    tmp_path: Path, store_fixtures: Fixtures, nix_daemon_env: dict[str, str]
) -> None:
    relay = DaemonSocketRelay(tmp_path / "daemon.sock")
    try:
        with start_cache(tmp_path / "srv", store_backend="daemon", daemon_socket=str(relay.path)) as cache:
            url = f"{cache.url}/{Path(store_fixtures.tree).name[:32]}.narinfo"
            assert httpx.get(url, timeout=20).status_code == 200
            before = relay.accepted
            relay.drop_all()  # every pooled connection is now dead, as after a daemon restart
            # paths this worker has not met, so that the daemon is asked (what it met stays current
            # while Nix's database says nothing changed: asking for `tree` again past
            # METADATA_TTL would not reach the daemon)
            for path in (store_fixtures.single, store_fixtures.link, store_fixtures.big):
                resp = httpx.get(f"{cache.url}/{Path(path).name[:32]}.narinfo", timeout=20)
                assert resp.status_code == 200, resp.text
            assert httpx.get(url, timeout=20).status_code == 200
            assert relay.accepted > before  # new connections replaced the dead ones
            assert "Traceback" not in cache.log
    finally:
        relay.close()


def test_daemon_backend_forgets_collected_paths(tmp_path: Path, nix_daemon_env: dict[str, str]) -> None:
    """The daemon backend remembers hash → path names; a collected path must still become a 404."""
    from tests.support.fixtures import unique_path_expr
    from tests.support.nix import build, run

    path = build(unique_path_expr(f"gc-daemon-{time.time_ns()}"), nix_daemon_env)[0]
    with start_cache(tmp_path, store_backend="daemon") as cache:
        url = f"{cache.url}/{Path(path).name[:32]}.narinfo"
        assert httpx.get(url, timeout=20).status_code == 200
        assert httpx.get(url, timeout=20).status_code == 200
        run(["nix-store", "--delete", path], env=nix_daemon_env)
        assert httpx.get(url, timeout=20).status_code == 404


@pytest.mark.parametrize("backend", ["db", "daemon"])
def test_references_fetched_ahead_are_still_404_once_collected(
    tmp_path: Path, nix_daemon_env: dict[str, str], backend: str
) -> None:
    """A narinfo's references are looked up ahead of the client (it walks the closure next); such an
    entry is checked like any other: once the path is collected it is a 404 at once."""
    from tests.support.fixtures import _MK
    from tests.support.nix import build, run

    tag = f"{backend}-{time.time_ns()}"
    expr = (
        "let"
        + _MK
        + f'dep = mk "hc-ahead-dep-{tag}" "/bin/echo dep > $out" {{}}; '
        + f'in mk "hc-ahead-top-{tag}" "/bin/echo ${{dep}} > $out" {{}}'
    )
    top = build(expr, nix_daemon_env)[0]
    dep = next(
        r
        for r in run(["nix-store", "-q", "--references", top], env=nix_daemon_env).stdout.split()
        if r != top
    )
    with start_cache(tmp_path, store_backend=backend) as cache:
        top_url = f"{cache.url}/{Path(top).name[:32]}.narinfo"
        dep_url = f"{cache.url}/{Path(dep).name[:32]}.narinfo"
        assert httpx.get(top_url, timeout=20).status_code == 200  # dep is fetched ahead now
        time.sleep(0.2)
        run(["nix-store", "--delete", top, dep], env=nix_daemon_env)
        assert httpx.get(dep_url, timeout=20).status_code == 404
        assert httpx.get(top_url, timeout=20).status_code == 404
