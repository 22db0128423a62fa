"""Throwaway network namespaces, so tailnet tests never touch the machine's real network.

Tailscale nodes advertise and use every interface address they see, and swap endpoints directly.
Run the control server, the relay and every node inside one namespace made by :func:`netns`: it has
``lo`` and a veth pair with both ends inside (``10.77.0.1/24`` and ``10.77.0.2/24``), both up, and a
default route over it, so nodes believe the network is up while nothing can leave.

Two ways to run things inside:

* a command: ``ns.argv(["caddy", "run", …])`` → ``ip netns exec <ns> caddy run …``;
* a Python function: ``await run_in_netns(ns, "pkg.module:function", {"arg": 1})`` (under
  ``trio.fail_after``), or ``run_in_netns_sync(..., timeout=120)``
  starts ``ip netns exec <ns> python -m tests.tailnet.child pkg.module:function '<json>'``, which
  runs the function (``async`` ones under ``trio.run``) and prints its JSON-able result; the parent
  returns it, or raises :class:`ChildFailed` with the child's stderr. In-process Python clients
  (arkitekt-mesh) must run this way: a process cannot move its existing sockets into a namespace.

The child runs in its own process group; on timeout or failure the whole group is killed, so
Caddy processes it started cannot outlive the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULT_PREFIX = "NETNS-RESULT "
READY_PREFIX = "NETNS-READY "


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no ``ip``, no kernel support)."""


class ChildFailed(RuntimeError):
    """The function run inside the namespace failed; the message carries its stderr tail."""


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or ``None`` if they can. Use it for ``pytest.skip``."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    return None


@dataclass(frozen=True)
class Netns:
    name: str
    address: str = "10.77.0.1"
    """The veth address services can bind to (127.0.0.1 works as well, inside)."""
    peer_address: str = "10.77.0.2"

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, argv: Sequence[str], *, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(argv), capture_output=True, text=True, timeout=timeout, check=check)


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")


@contextlib.contextmanager
def netns(prefix: str = "hb") -> Iterator[Netns]:
    """Create a uniquely named namespace wired as described above; delete it on exit."""
    reason = unavailable_reason()
    if reason is not None:
        raise NetnsUnavailable(reason)
    ns = Netns(f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}")
    _ip("netns", "add", ns.name)
    try:
        _ip("-n", ns.name, "link", "set", "lo", "up")
        _ip("-n", ns.name, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
        _ip("-n", ns.name, "addr", "add", f"{ns.address}/24", "dev", "veth0")
        _ip("-n", ns.name, "addr", "add", f"{ns.peer_address}/24", "dev", "veth1")
        _ip("-n", ns.name, "link", "set", "veth0", "up")
        _ip("-n", ns.name, "link", "set", "veth1", "up")
        _ip("-n", ns.name, "route", "add", "default", "via", ns.peer_address, "dev", "veth0")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, timeout=10, check=False)


def _child_argv(ns: Netns, target: str, kwargs: dict[str, Any]) -> list[str]:
    return ns.argv([sys.executable, "-m", "tests.tailnet.child", target, json.dumps(kwargs)])


def child_env() -> dict[str, str]:
    """The environment for Python processes in the namespace: the repository importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _parse_result(stdout: str, stderr: str, returncode: int | None, target: str) -> Any:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            if returncode == 0:
                return json.loads(line[len(RESULT_PREFIX) :])
            break
    tail = "\n".join(stderr.splitlines()[-60:])
    raise ChildFailed(f"{target} in namespace exited with {returncode}; stderr tail:\n{tail}")


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run_in_netns_sync(ns: Netns, target: str, kwargs: dict[str, Any] | None = None, *, timeout: float) -> Any:
    """Blocking form of :func:`run_in_netns` (for module-scoped fixtures)."""
    proc = subprocess.Popen(
        _child_argv(ns, target, kwargs or {}),
        cwd=REPO_ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        stdout, stderr = proc.communicate()
        raise ChildFailed(
            f"{target} timed out after {timeout}s; stderr tail:\n" + "\n".join(stderr.splitlines()[-60:])
        ) from None
    finally:
        _kill_group(proc.pid)  # anything the child left behind (e.g. a Caddy it spawned)
    return _parse_result(stdout, stderr, proc.returncode, target)


async def run_in_netns(ns: Netns, target: str, kwargs: dict[str, Any] | None = None) -> Any:
    """Run ``module:function(**kwargs)`` in a fresh Python process inside ``ns``; its result.

    Put it under ``trio.fail_after``: when cancelled, the child's process group is killed and its
    stderr tail is written to ours (pytest shows it with the failure)."""
    proc = await trio.lowlevel.open_process(
        _child_argv(ns, target, kwargs or {}),
        cwd=REPO_ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    out, err = bytearray(), bytearray()

    async def pump(stream: trio.abc.ReceiveStream | None, buf: bytearray) -> None:
        assert stream is not None
        async for chunk in stream:
            buf += chunk

    done = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, proc.stdout, out)
            nursery.start_soon(pump, proc.stderr, err)
            await proc.wait()
        done = True
    finally:
        _kill_group(proc.pid)
        with trio.CancelScope(shield=True):
            await proc.wait()
        if not done:
            tail = "\n".join(err.decode(errors="replace").splitlines()[-60:])
            sys.stderr.write(f"{target} in namespace {ns.name} stopped early; stderr tail:\n{tail}\n")
    return _parse_result(out.decode(errors="replace"), err.decode(errors="replace"), proc.returncode, target)


def report_ready(data: Any) -> None:
    """For a long-running function under :func:`background_in_netns`: say it is ready (one
    ``NETNS-READY <json>`` line on stdout) and hand ``data`` to the parent."""
    sys.stdout.write(READY_PREFIX + json.dumps(data) + "\n")
    sys.stdout.flush()


def _read_line_until(proc: subprocess.Popen[str], prefix: str, deadline: float) -> str | None:
    """The first stdout line of ``proc`` starting with ``prefix`` (``None`` at EOF)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buffer = b""
    while True:
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            text = line.decode(errors="replace")
            if text.startswith(prefix):
                return text[len(prefix) :]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            buffer += chunk


@contextlib.contextmanager
def background_in_netns(
    ns: Netns,
    argv: Sequence[str],
    *,
    ready_prefix: str,
    log_path: Path,
    timeout: float,
    stop_grace: float = 15,
) -> Iterator[str]:
    """Run ``argv`` (a command, e.g. ``[sys.executable, "-m", …]``) inside ``ns`` in the
    background; yield the rest of its first stdout line that starts with ``ready_prefix``
    (within ``timeout`` s, else :class:`ChildFailed` with its log). Its stderr goes to
    ``log_path``. On exit its stdin is closed (its cue to stop); if it has not ended after
    ``stop_grace`` s it gets SIGTERM, and then its whole process group is killed (also anything
    it started)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            ns.argv(argv),
            cwd=REPO_ROOT,
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            start_new_session=True,
        )
    try:
        try:
            line = _read_line_until(proc, ready_prefix, time.monotonic() + timeout)
        except TimeoutError:
            line = None
        if line is None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-60:])
            raise ChildFailed(f"{' '.join(argv)} did not get ready within {timeout}s; log tail:\n{tail}")
        yield line
    finally:
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(timeout=stop_grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        _kill_group(proc.pid)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
