"""The deployment's own check, without VMs: a cache host and a client host as network namespaces.

- Two namespaces made here (unique names), joined by a veth pair: the server at 10.88.0.1, the
  client at 10.88.0.2. The addresses exist only inside them; both are deleted at the end.
- The server runs what systemd would run for deploy/systemd/harmonia-dev.service: ExecStart and
  Environment are read from the unit (not copied), specifiers expanded, the credential copied
  into a credentials directory (LoadCredential), STATE_DIRECTORY/WorkingDirectory, NOTIFY_SOCKET
  and WATCHDOG_USEC set as systemd sets them, the shipped harmonia.toml as the settings file.
  Paths under /etc/harmonia are relocated into the test's directory. As with DynamicUser=yes, the
  cache runs as an unprivileged uid with no passwd entry (setpriv, no new privileges), owning only
  its state directory and its credential copy; the secret key files stay root's. What this cannot
  emulate without systemd: the rest of the sandbox (ProtectSystem=…); `systemd-analyze verify`
  checks those settings in test_deploy_systemd.py. The programs are those of a deployment's install
  (`pip install .`, non-editable, into a venv every user can read: tests/support/service_venv.py),
  not this checkout's editable `.venv`, which the service uid cannot read in a private clone.
- The client fetches a signed artifact with `nix copy --from http://10.88.0.1:5000` into its own
  store with require-sigs and the cache's key (and fails with another key).
- The cache restarts, this time through the socket unit (LISTEN_FDS, as harmonia-dev.socket
  would hand it over) and with the key-rotation drop-in (deploy/systemd/rotate-key.conf): every
  narinfo carries both signatures, and clients trusting either key fetch again.
- One artifact is pinned with `harmonia-cache pin`, one is not; the collector runs on the server
  (`nix-store --delete`, on our own paths only: other tests share the store). The pinned artifact
  still reaches a fresh client store; the other one is a 404.

The Nix store and daemon socket are shared by all namespaces (same file system); the network path
between the hosts is what is validated.
"""

from __future__ import annotations

import grp
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from cache import gcroots
from deploy import render
from tests.support.nix import build, have_nix, nix_env, path_info
from tests.support.service_venv import service_venv

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not have_nix(), reason="Nix is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and GC roots need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 (ip) is not installed"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing"),
]

SERVER_IP, CLIENT_IP = "10.88.0.1", "10.88.0.2"
PORT = 5000
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ETC = "/etc/harmonia/"
# like a DynamicUser uid (systemd picks them from 61184-65519): no passwd entry, owns nothing else
SERVICE_UID = 61523


def as_service_user(argv: list[str], groups: list[int] | None = None) -> list[str]:
    uid = str(SERVICE_UID)
    group_args = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    setpriv = shutil.which("setpriv")
    assert setpriv is not None
    return [setpriv, "--reuid", uid, "--regid", uid, *group_args, "--no-new-privs", "--", *argv]


def dropins() -> list[str]:
    """The drop-ins an admin of this host installs: nix-users.conf where the daemon's socket is
    limited to that group (Debian's nix-bin)."""
    try:
        grp.getgrnam("nix-users")
    except KeyError:
        return []
    return [(render.UNIT_DIR / "nix-users.conf").read_text()]


# --- two hosts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hosts:
    server: str
    client: str


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)


def must(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{' '.join(result.args)}: {result.stderr}"


@contextmanager
def two_hosts() -> Iterator[Hosts]:
    tag = uuid.uuid4().hex[:8]
    hosts = Hosts(server=f"hxd-srv-{tag}", client=f"hxd-cli-{tag}")
    created: list[str] = []
    try:
        for ns in (hosts.server, hosts.client):
            made = ip("netns", "add", ns)
            if made.returncode != 0:
                pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
            created.append(ns)
        # interface names: at most 15 characters
        veth = ip(
            "link",
            "add",
            f"hs{tag}",
            "netns",
            hosts.server,
            "type",
            "veth",
            "peer",
            "name",
            f"hc{tag}",
            "netns",
            hosts.client,
        )
        if veth.returncode != 0:
            pytest.skip(f"cannot create a veth pair between namespaces: {veth.stderr.strip()}")
        for ns, dev, addr in ((hosts.server, f"hs{tag}", SERVER_IP), (hosts.client, f"hc{tag}", CLIENT_IP)):
            must(ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev))
            must(ip("-n", ns, "link", "set", "lo", "up"))
            must(ip("-n", ns, "link", "set", dev, "up"))
        yield hosts
    finally:
        for ns in created:  # deleting a namespace deletes its end of the veth pair, and the pair
            ip("netns", "del", ns)


def in_ns(
    ns: str, argv: list[str], env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --- the unit, as systemd would run it -----------------------------------------------------------


def relocate(value: str, root: Path) -> str:
    return str(root / "etc/harmonia" / value[len(ETC) :]) if value.startswith(ETC) else value


def timespan_usec(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*(ms|s|min)?", text)
    assert m, f"unsupported time span {text!r}"
    return int(m.group(1)) * {"ms": 1_000, "s": 1_000_000, "min": 60_000_000, None: 1_000_000}[m.group(2)]


@dataclass
class Unit:
    """harmonia-dev.service installed under `root` (prefix: the bundle's bin directory), ready to start."""

    root: Path
    argv: list[str]
    env: dict[str, str]
    workdir: Path
    watchdog_usec: int
    listen_stream: str
    public_keys: list[str]
    groups: list[int]  # SupplementaryGroups=

    @classmethod
    def install(cls, root: Path, dropins: list[str], prefix: str) -> Unit:
        """Install the unit (plus drop-ins, in order) under `root`: files, keys, credentials."""
        text = render.with_prefix((render.UNIT_DIR / "harmonia-dev.service").read_text(), prefix)
        text = "\n".join([text, *dropins])
        sections = render.parse_unit(text)
        creds = root / "run/credentials/harmonia-dev.service"
        state_root = root / "var/lib"
        specifiers = {"d": str(creds), "S": str(state_root), "n": "harmonia-dev.service"}
        cmd = render.service_command(text, specifiers)

        # the settings file and the signing keys, where the unit expects them
        etc = root / "etc/harmonia"
        (etc / "keys").mkdir(parents=True, exist_ok=True)
        shutil.copy(render.UNIT_DIR / "harmonia.toml", etc / "harmonia.toml")
        creds.mkdir(parents=True, exist_ok=True)
        public_keys = []
        for credential in render.values(sections, "Service", "LoadCredential"):
            name, source = credential.split(":", 1)
            secret = Path(relocate(source, root))
            if not secret.exists():
                generated = subprocess.run(
                    [
                        f"{prefix}/harmonia-cache",
                        "key",
                        "generate",
                        name,
                        "--secret-file",
                        str(secret),
                        "--public-file",
                        str(secret.with_suffix(".public")),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                assert generated.returncode == 0, generated.stderr
            public_keys.append(secret.with_suffix(".public").read_text().strip())
            # LoadCredential: a private copy in the credentials directory, the service's own
            copy = creds / name
            if copy.exists():
                copy.unlink()
            shutil.copy(secret, copy)
            os.chown(copy, SERVICE_UID, SERVICE_UID)
            os.chmod(copy, 0o400)
        os.chmod(etc / "keys", 0o700)  # the secrets themselves stay root's

        state = state_root / str(render.value(sections, "Service", "StateDirectory"))
        state.mkdir(parents=True, exist_ok=True)
        os.chown(state, SERVICE_UID, SERVICE_UID)  # StateDirectory= with DynamicUser=yes
        workdir = Path(
            render.expand_specifiers(str(render.value(sections, "Service", "WorkingDirectory")), specifiers)
        )
        env = {
            "PATH": SYSTEMD_PATH,
            "LANG": "C.UTF-8",
            "CREDENTIALS_DIRECTORY": str(creds),
            "STATE_DIRECTORY": str(state),
            **{k: relocate(v, root) for k, v in cmd.environment.items()},
        }
        socket_unit = render.parse_unit((render.UNIT_DIR / "harmonia-dev.socket").read_text())
        return cls(
            root=root,
            argv=[relocate(w, root) for w in cmd.argv],
            env=env,
            workdir=workdir,
            watchdog_usec=timespan_usec(str(render.value(sections, "Service", "WatchdogSec"))),
            listen_stream=str(render.value(socket_unit, "Socket", "ListenStream")),
            public_keys=public_keys,
            groups=[
                grp.getgrnam(g).gr_gid
                for v in render.values(sections, "Service", "SupplementaryGroups")
                for g in v.split()
            ],
        )

    @property
    def public_key(self) -> str:
        return self.public_keys[0]


# Socket activation as harmonia-dev.socket does it: bind ListenStream (BindIPv6Only=both), pass
# the socket as fd 3 with LISTEN_FDS=1 and LISTEN_PID set to this pid, which then execs the
# service (through setpriv, which keeps the pid and the descriptor).
ACTIVATE = """
import os, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind((host.strip("[]"), int(port)))
s.listen(1024)
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="harmonia-dev.socket")
os.execve(sys.argv[2], sys.argv[2:], env)
"""


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    log: Path
    notifications: list[str]
    notify: socket.socket

    def wait_for(self, message: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(message in n.splitlines() for n in self.notifications):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no {message} from the cache within {timeout}s; got {self.notifications}\n"
                    f"{self.log.read_text()}"
                )
            if self.proc.poll() is not None:
                raise AssertionError(f"the cache exited {self.proc.returncode}\n{self.log.read_text()}")
            self.notify.settimeout(min(remaining, 0.2))
            with suppress(TimeoutError):
                self.notifications.append(self.notify.recv(4096).decode())


DAEMON_SOCKET_DIR = Path("/nix/var/nix/daemon-socket")


@contextmanager
def private_daemon(root: Path) -> Iterator[Path]:
    """A nix-daemon of our own on the same store, its socket in a directory with the owner and
    mode of the machine's socket directory. The cache sees it at the usual path (a bind mount in
    its own mount namespace), so another session's daemon coming and going cannot disturb it."""
    directory = root / "daemon-socket"
    directory.mkdir()
    real = os.stat(DAEMON_SOCKET_DIR) if DAEMON_SOCKET_DIR.is_dir() else None
    if real is not None:
        os.chown(directory, real.st_uid, real.st_gid)
        os.chmod(directory, stat.S_IMODE(real.st_mode))
    else:
        os.chmod(directory, 0o755)
    sock = directory / "socket"
    env = nix_env(root / "daemon-xdg", NIX_DAEMON_SOCKET_PATH=str(sock))
    with (root / "nix-daemon.log").open("wb") as log:
        proc = subprocess.Popen(
            ["nix-daemon"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                with socket.socket(socket.AF_UNIX) as probe:
                    try:
                        probe.connect(str(sock))
                        break
                    except OSError:
                        pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"nix-daemon did not start:\n{(root / 'nix-daemon.log').read_text()}"
                    )
                time.sleep(0.05)
            yield directory
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@contextmanager
def start(
    unit: Unit, ns: str, tag: str, daemon: Path, *, activated: bool = False, watchdog_usec: int | None = None
) -> Iterator[Running]:
    """Run the unit's command in `ns` until the block ends; stop it as systemd does (SIGTERM).

    `daemon`: the directory of our nix-daemon's socket, mounted over the usual one for the cache.
    """
    # a short directory: a unix socket path must fit in 108 bytes, wherever pytest's tmp is
    sockets = Path(tempfile.mkdtemp(prefix="hxd-", dir="/tmp"))
    os.chmod(sockets, 0o755)
    notify_path = sockets / "notify.sock"
    log = unit.root / f"cache-{tag}.log"
    env = dict(
        unit.env, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC=str(watchdog_usec or unit.watchdog_usec)
    )
    # as systemd: the socket is bound with root's rights, then the service runs as its user
    argv = as_service_user(unit.argv, unit.groups)
    if activated:
        argv = [sys.executable, "-c", ACTIVATE, unit.listen_stream, *argv]
    # `ip netns exec` runs the command in a mount namespace of its own: the mount stays there
    argv = ["sh", "-c", f'mount --bind "$0" {DAEMON_SOCKET_DIR} && exec "$@"', str(daemon), *argv]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, log.open("wb") as out:
        notify.bind(str(notify_path))
        os.chmod(notify_path, 0o777)  # systemd's notify socket is writable by every service
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            env=env,
            cwd=unit.workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        running = Running(proc, log, [], notify)
        try:
            running.wait_for("READY=1", timeout=30)
            uid_line = next(
                line
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                if line.startswith("Uid:")
            )
            assert uid_line.split()[1:] == [str(SERVICE_UID)] * 4, uid_line
            yield running
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            shutil.rmtree(sockets, ignore_errors=True)


def why(result: subprocess.CompletedProcess[str], running: Running) -> str:
    return f"{result.stderr}\n--- the cache's log ---\n{running.log.read_text()}"


def stop(running: Running) -> int:
    running.proc.send_signal(signal.SIGTERM)
    return running.proc.wait(20)


# --- the client ----------------------------------------------------------------------------------


def fetch(
    hosts: Hosts, tmp: Path, path: str, key: str, tag: str
) -> tuple[subprocess.CompletedProcess[str], str, dict[str, str]]:
    """`nix copy` one path from the cache into a fresh store on the client host."""
    store = f"local?root={tmp / f'client-{tag}'}"
    env = nix_env(tmp / f"xdg-{tag}", extra_config=f"require-sigs = true\ntrusted-public-keys = {key}\n")
    result = in_ns(
        hosts.client, ["nix", "copy", "--from", f"http://{SERVER_IP}:{PORT}", "--to", store, path], env=env
    )
    return result, store, env


HTTP_GET = """
import http.client, sys
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=20)
c.request("GET", sys.argv[3])
r = c.getresponse()
sys.stdout.write(f"{r.status}\\n" + r.read().decode("utf-8", "replace"))
"""


def http_get(hosts: Hosts, url_path: str) -> tuple[int, str]:
    """GET from the client host; the status and the body."""
    result = in_ns(hosts.client, [sys.executable, "-c", HTTP_GET, SERVER_IP, str(PORT), url_path], timeout=60)
    assert result.returncode == 0, result.stderr
    status, _, body = result.stdout.partition("\n")
    return int(status), body


def narinfo_path(store_path: str) -> str:
    return f"/{Path(store_path).name[:32]}.narinfo"


# --- the test ------------------------------------------------------------------------------------


def artifacts(env: dict[str, str], tag: str) -> tuple[str, str]:
    expr = f"""
      let mk = name: script: builtins.derivation {{
        inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ];
      }};
      in [
        (mk "harmonia-deploy-pinned-{tag}" ''
          /bin/mkdir -p $out/bin; echo pinned {tag} > $out/data; /bin/ln -s data $out/link
          echo '#!/bin/sh' > $out/bin/run; /bin/chmod +x $out/bin/run
        '')
        (mk "harmonia-deploy-loose-{tag}" "echo loose {tag} > $out")
      ]
    """
    pinned, loose = build(expr, env)
    return pinned, loose


@pytest.fixture
def host_root() -> Iterator[Path]:
    """The server's file system root for /etc/harmonia and /var/lib: traversable by the service
    user (pytest's own tmp directory is not)."""
    root = Path(tempfile.mkdtemp(prefix="hxd-host-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def service_bin() -> str:
    """The bundle installed as docs/deploy.md does (`pip install .` into a venv every user can read):
    the service's uid must read its programs wherever this checkout is, a private clone included."""
    return str(service_venv())


def test_two_hosts_fetch_restart_pin_and_collect(tmp_path: Path, host_root: Path, service_bin: str) -> None:
    with private_daemon(host_root) as daemon:  # the shipped settings use store_backend = "daemon"
        two_hosts_fetch_restart_pin_and_collect(tmp_path, host_root, daemon, service_bin)
    # the cache read the store through the daemon, as the service user
    assert f"user {SERVICE_UID}" in (host_root / "nix-daemon.log").read_text()


def two_hosts_fetch_restart_pin_and_collect(
    tmp_path: Path, host_root: Path, daemon: Path, prefix: str
) -> None:
    tag = uuid.uuid4().hex[:10]
    local_env = nix_env(tmp_path / "xdg-local")
    unit = Unit.install(host_root, dropins(), prefix)
    cache_cli = unit.argv[0]
    pinned, loose = artifacts(local_env, tag)
    root = gcroots.default_gcroots_dir() / gcroots.root_name(gcroots.parse_store_path(pinned))
    health_cmd = render.service_command(
        render.with_prefix((render.UNIT_DIR / "harmonia-healthcheck.service").read_text(), prefix),
        {},
    )
    try:
        with two_hosts() as hosts:
            # --- first start, exactly the unit's command and environment
            with start(unit, hosts.server, "first", daemon) as first:
                assert f"listening on http://[::]:{PORT}" in first.log.read_text()
                assert any(n.startswith("READY=1") for n in first.notifications)
                health = in_ns(hosts.server, as_service_user(health_cmd.argv), env={"PATH": SYSTEMD_PATH})
                assert health.returncode == 0, why(health, first)
                status, info = http_get(hosts, "/nix-cache-info")
                assert status == 200
                assert "Priority: 60" in info.splitlines()

                ok, store, env = fetch(hosts, tmp_path, pinned, unit.public_key, "first")
                assert ok.returncode == 0, why(ok, first)
                got = path_info(pinned, env, store=store)
                want = path_info(pinned, local_env)
                assert got["narHash"] == want["narHash"]
                signatures = got["signatures"]
                assert isinstance(signatures, list)
                assert any(str(s).startswith("harmonia-raider-1:") for s in signatures)
                assert (
                    Path(store.split("=", 1)[1]) / pinned.lstrip("/") / "data"
                ).read_text() == f"pinned {tag}\n"

                # require-sigs is in force: another key is refused
                other = "other-cache-1:" + "A" * 43 + "="
                refused, _, _ = fetch(hosts, tmp_path, pinned, other, "wrong-key")
                assert refused.returncode != 0
                assert "lacks a valid signature" in refused.stderr

                pin = in_ns(hosts.server, [cache_cli, "pin", pinned])
                assert pin.returncode == 0, why(pin, first)
                assert os.readlink(root) == pinned

                assert stop(first) == 0, first.log.read_text()  # a clean stop, as systemd wants
            down = in_ns(hosts.server, as_service_user(health_cmd.argv), env={"PATH": SYSTEMD_PATH})
            assert down.returncode == 1
            assert down.stderr.startswith("unhealthy: ")

            # --- restart, through the socket unit, with a short watchdog to see the pings, and
            # with the key-rotation drop-in: a second key signs too
            rotated = Unit.install(
                host_root, [*dropins(), (render.UNIT_DIR / "rotate-key.conf").read_text()], prefix
            )
            assert rotated.public_keys[0] == unit.public_key
            assert rotated.env["SIGN_KEY_PATHS"].split() == [
                str(rotated.root / "run/credentials/harmonia-dev.service" / name)
                for name in ("harmonia-raider-1", "harmonia-raider-2")
            ]
            with start(
                rotated, hosts.server, "second", daemon, activated=True, watchdog_usec=2_000_000
            ) as second:
                second.wait_for("WATCHDOG=1", timeout=5)
                status, narinfo = http_get(hosts, narinfo_path(pinned))
                assert status == 200
                sigs = [
                    line.split(": ", 1)[1].split(":", 1)[0]
                    for line in narinfo.splitlines()
                    if line.startswith("Sig: ")
                ]
                assert sigs == ["harmonia-raider-1", "harmonia-raider-2"]
                for key in rotated.public_keys:  # a client trusting either key accepts
                    again, _, _ = fetch(hosts, tmp_path, pinned, key, f"second-{key[:17]}")
                    assert again.returncode == 0, why(again, second)
                before_gc, _, _ = fetch(hosts, tmp_path, loose, unit.public_key, "loose-before")
                assert before_gc.returncode == 0, why(before_gc, second)

                # --- garbage collection on the server: our two paths only
                kept = in_ns(hosts.server, ["nix-store", "--delete", pinned], env=local_env)
                assert kept.returncode != 0
                assert "still alive" in kept.stderr
                collected = in_ns(hosts.server, ["nix-store", "--delete", loose], env=local_env)
                assert collected.returncode == 0, why(collected, second)
                assert not Path(loose).exists()

                after, store, env = fetch(hosts, tmp_path, pinned, unit.public_key, "after-gc")
                assert after.returncode == 0, why(after, second)
                assert path_info(pinned, env, store=store)["narHash"] == want["narHash"]
                assert http_get(hosts, narinfo_path(pinned))[0] == 200
                assert http_get(hosts, narinfo_path(loose))[0] == 404
                gone, _, _ = fetch(hosts, tmp_path, loose, unit.public_key, "loose-after")
                assert gone.returncode != 0

            # the secret keys reached neither the logs nor systemd's notifications
            logs = "".join(r.log.read_text() for r in (first, second))
            notes = "".join(first.notifications + second.notifications)
            for secret in (unit.root / "etc/harmonia/keys").glob("*.secret"):
                material = secret.read_text().strip().split(":", 1)[1]
                assert material[:16] not in logs
                assert material[:16] not in notes
    finally:
        if os.path.lexists(root):
            root.unlink()
        for path in (pinned, loose):
            if Path(path).exists():
                subprocess.run(
                    ["nix-store", "--delete", path],
                    env=local_env,
                    capture_output=True,
                    timeout=120,
                    check=False,
                )
