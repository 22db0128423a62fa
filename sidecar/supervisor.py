"""Supervision: run the engine, keep it configured, restart it when it dies, answer health.

Structured with trio: ``Sidecar.run`` reports readiness through ``task_status`` once the engine
is up with the config applied; cancelling it stops everything (Caddy is terminated, and the
kernel SIGTERMs it even if this process is killed). SIGHUP re-reads the configuration through
the ``reload`` callable: added or removed services take effect with one ``POST /load``, and the
untouched services keep their nodes.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

import trio

from common.problems import ConfigError, Problem

from . import metrics
from .authkey import SessionFactory, resolve_auth_keys
from .control_http import Handler, Reply, serve_listeners
from .engine import CaddyEngine, EngineError, NodeState, NodeStatus
from .lifecycle import EngineState, Lifecycle
from .model import Secret, ValidConfig
from .whois import DeviceSource, Directory, node_headers, read_api_credentials, whois_address

log = logging.getLogger(__name__)

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0
DEFAULT_WHOIS_TIMEOUT = 1.0


class StartupTimeout(Exception):
    pass


def lock_node_dirs(cfg: ValidConfig, held: dict[str, IO[str]]) -> None:
    """Create each node's state directory (0700) and hold a lock in it, so two sidecars (or two
    services) never run one node's state: that is how duplicate node keys happen."""
    problems: list[Problem] = []
    for s in cfg.services:
        if s.node_dir in held:
            continue
        try:
            os.makedirs(s.node_dir, mode=0o700, exist_ok=True)
            # held open (and locked) for as long as the service runs
            f = open(  # noqa: SIM115
                os.path.join(s.node_dir, ".harmonia-sidecar.lock"),
                "a+",
                encoding="utf-8",
            )
        except OSError as exc:
            problems.append(Problem(f"{s.name}.state_dir", f"cannot use {s.node_dir!r}: {exc.strerror}"))
            continue
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            problems.append(
                Problem(
                    f"{s.name}.state_dir",
                    f"{s.node_dir!r} is in use by another harmonia-sidecar; each node needs its own state",
                )
            )
            continue
        held[s.node_dir] = f
    if problems:
        raise ConfigError(problems)


LOCK_NAME = ".harmonia-sidecar.lock"


def _holder(f: IO[str]) -> str:
    f.seek(0)
    pid = f.read().strip()
    return f"pid {pid}" if pid.isdigit() else "another process"


def lock_process_dir(cfg: ValidConfig) -> list[IO[str]]:
    """Take this process's own directory (engine and control socket) for as long as it runs.

    Two processes on one state root with the same instance name (the same service name from
    flags, or config files of the same name) would replace each other's engine and control
    socket; the second is refused here, before it touches either, with the way out. Returns the
    open, locked files (closing them releases the directory).
    """
    held: list[IO[str]] = []
    locks = [os.path.join(cfg.engine_dir, LOCK_NAME)]
    if os.path.dirname(cfg.health_socket) != cfg.engine_dir:  # --health-socket elsewhere: its own lock
        locks.append(cfg.health_socket + ".lock")
    for path in locks:
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the process's life
        except OSError as exc:
            for g in held:
                g.close()
            raise ConfigError([Problem("state root", f"cannot use {path!r}: {exc.strerror}")]) from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(f)
            f.close()
            for g in held:
                g.close()
            what = (
                f"{cfg.engine_dir!r} (the engine directory and control socket of a sidecar process)"
                if path.startswith(cfg.engine_dir + os.sep)
                else f"the control socket {cfg.health_socket!r}"
            )
            raise ConfigError(
                [
                    Problem(
                        "state root",
                        f"{what} is in use by another harmonia-sidecar ({holder}) on the state root "
                        f"{cfg.state_root!r}. Give this process a state root of its own "
                        "(TS_STATE_DIR=DIR or --state-root DIR), or publish all the services from one "
                        "process: harmonia-sidecar --config FILE with a [services.NAME] table each",
                    )
                ]
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        held.append(f)
    return held


def release_unused(cfg: ValidConfig, held: dict[str, IO[str]]) -> None:
    keep = {s.node_dir for s in cfg.services}
    for path in [p for p in held if p not in keep]:
        held.pop(path).close()


def bind_unix(path: str) -> socket.socket:
    """A listening unix socket at ``path`` (0600), replacing a stale one."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


def engine_errors(exc: BaseException) -> list[EngineError] | None:
    """The EngineErrors in ``exc`` if that is all it holds, else None (re-raise it)."""
    if isinstance(exc, EngineError):
        return [exc]
    if isinstance(exc, BaseExceptionGroup):
        match, rest = exc.split(EngineError)
        if rest is None and match is not None:
            out: list[EngineError] = []
            for e in match.exceptions:
                inner = engine_errors(e)
                if inner is None:
                    return None
                out.extend(inner)
            return out
    return None


@dataclass
class Sidecar:
    cfg: ValidConfig
    engine: CaddyEngine
    reload: Callable[[], ValidConfig] | None = None
    session_factory: SessionFactory | None = None
    handle_signals: bool = True
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    _keys: dict[str, Secret | None] = field(default_factory=dict)
    _locks: dict[str, IO[str]] = field(default_factory=dict)  # node directories, by path
    _own_locks: list[IO[str]] = field(default_factory=list)  # this process's directory
    _applied: trio.Event = field(default_factory=trio.Event)
    _reload_lock: trio.Lock = field(default_factory=trio.Lock)
    traffic: dict[str, metrics.ServiceTraffic] = field(default_factory=dict)
    metrics_address: tuple[str, int] | None = None  # bound prometheus_addr (port 0 resolved)
    directory: Directory | None = None  # the whois directory, with API credentials

    def __post_init__(self) -> None:
        self.engine.on_access = self._count

    @property
    def engine_up(self) -> bool:
        return self.lifecycle.engine_up

    @property
    def restarts(self) -> int:
        return self.lifecycle.restarts

    def _count(self, service: str, entry: dict[str, object]) -> None:
        self.traffic.setdefault(service, metrics.ServiceTraffic()).observe(entry)

    # ------------------------------------------------------------------ lifecycle

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Prepare (locks, auth keys), serve health, supervise the engine. Readiness = the engine
        runs with the config applied (the nodes may still be connecting)."""
        self._own_locks = lock_process_dir(self.cfg)
        try:
            lock_node_dirs(self.cfg, self._locks)
        except ConfigError:
            self._release_all()
            raise
        for s in self.cfg.services:
            if s.whois and s.whois_timeout != DEFAULT_WHOIS_TIMEOUT:
                log.warning(
                    "%s: whois_timeout %gs is not enforced: the caddy-tailscale engine "
                    "looks callers up in-process, without a deadline of its own",
                    s.name,
                    s.whois_timeout,
                )
        try:
            api_secret = await self._prepare_keys()
            async with trio.open_nursery() as nursery:
                if api_secret is not None:
                    self.directory = Directory(DeviceSource(api_secret, self.session_factory))
                    await nursery.start(self.directory.run)
                await nursery.start(self._serve_health)
                await nursery.start(self._supervise)
                if self.handle_signals:
                    nursery.start_soon(self._sighup_loop)
                task_status.started()
        finally:
            self._release_all()

    def _release_all(self) -> None:
        for f in [*self._locks.values(), *self._own_locks]:
            f.close()
        self._locks.clear()
        self._own_locks.clear()

    async def _prepare_keys(self) -> Secret | None:
        """Read the nodes' auth keys and the directory's API credentials; every problem of
        both is reported in one ``ConfigError``."""
        problems: list[Problem] = []
        api_secret: Secret | None = None
        if self.cfg.api_key is not None:
            try:
                api_secret = await read_api_credentials(self.cfg.api_key)
            except ConfigError as exc:
                problems.extend(exc.problems)
        try:
            self._keys = await resolve_auth_keys(self.cfg, session_factory=self.session_factory)
        except ConfigError as exc:
            problems.extend(exc.problems)
        if problems:
            raise ConfigError(problems)
        return api_secret

    async def _supervise(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        backoff = BACKOFF_START
        life = self.lifecycle
        try:
            while True:
                started_at = trio.current_time()
                try:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(self.engine.start)
                        async with self._reload_lock:
                            await self.engine.apply(self.cfg, self._keys)
                        first = life.state is EngineState.STARTING
                        life.to(EngineState.RUNNING)
                        log.info("engine: config applied (%s)", ", ".join(s.name for s in self.cfg.services))
                        if first:
                            task_status.started()
                except (EngineError, BaseExceptionGroup) as exc:
                    errors = engine_errors(exc)
                    if errors is None:
                        raise
                    if life.state is EngineState.STARTING:
                        raise errors[0] from None
                    log.error("engine: %s", "; ".join(str(e) for e in errors))
                if life.state is EngineState.RUNNING:
                    life.to(EngineState.RESTARTING)
                if trio.current_time() - started_at > STABLE_AFTER:
                    backoff = BACKOFF_START
                log.warning("engine: restarting in %.1fs (restart #%d)", backoff, life.restarts)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
        finally:
            if life.state is not EngineState.STOPPED:
                life.to(EngineState.STOPPED)

    async def wait_engine_down(self) -> None:
        """Until the running engine has died (drills and tests)."""
        await self.lifecycle.wait_for(EngineState.RESTARTING, EngineState.STOPPED)

    async def wait_engine(self) -> None:
        """Until the engine runs with the config applied (at once if it does now)."""
        await self.lifecycle.wait_for(EngineState.RUNNING)

    async def wait_running(self) -> list[NodeStatus]:
        """Wait until every node has its tailnet addresses, within the start-up timeout."""
        limit = max(s.startup_timeout for s in self.cfg.services)
        statuses: list[NodeStatus] = []
        with trio.move_on_after(limit):
            while True:
                statuses = await self.statuses()
                if all(st.state is NodeState.RUNNING for st in statuses):
                    return statuses
                await trio.sleep(0.25)
        waiting = [
            f"{st.name} ({st.state.value}: {st.detail})"
            for st in statuses
            if st.state is not NodeState.RUNNING
        ]
        raise StartupTimeout(f"not on the tailnet after {limit:g}s: {', '.join(waiting)}")

    async def statuses(self) -> list[NodeStatus]:
        return [await self.engine.node_status(s.name) for s in self.cfg.services]

    # ------------------------------------------------------------------ reconfiguration

    async def _sighup_loop(self) -> None:
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                await self.reconfigure()

    async def reconfigure(self, new: ValidConfig | None = None) -> bool:
        """Re-read (or take) the configuration and apply it; on any problem keep the old one."""
        async with self._reload_lock:
            try:
                if new is None:
                    if self.reload is None:
                        log.info("SIGHUP: no config file to re-read; re-applying the config")
                        new = self.cfg
                    else:
                        new = self.reload()
                if new.api_key != self.cfg.api_key:
                    log.warning(
                        "reconfiguration: a change of api_key_path / TS_API_KEY takes "
                        "effect at the next start; keeping the running whois directory"
                    )
                    new = dataclasses.replace(new, api_key=self.cfg.api_key)
                if (new.engine_dir, new.health_socket) != (self.cfg.engine_dir, self.cfg.health_socket):
                    log.warning(
                        "reconfiguration: the engine directory and control socket stay %s and %s "
                        "until the next start",
                        self.cfg.engine_dir,
                        self.cfg.health_socket,
                    )
                    new = dataclasses.replace(
                        new, engine_dir=self.cfg.engine_dir, health_socket=self.cfg.health_socket
                    )
                old_by_name = {s.name: s for s in self.cfg.services}
                changed = [s for s in new.services if old_by_name.get(s.name) != s]
                lock_node_dirs(new, self._locks)
                keys = {s.name: self._keys.get(s.name) for s in new.services}
                keys.update(
                    await resolve_auth_keys(new, services=changed, session_factory=self.session_factory)
                )
                await self.engine.apply(new, keys)
            except (ConfigError, EngineError, OSError) as exc:
                log.error("reconfiguration refused, keeping the running config: %s", exc)
                if new is not None:
                    release_unused(self.cfg, self._locks)
                return False
            added = sorted({s.name for s in new.services} - set(old_by_name))
            removed = sorted(set(old_by_name) - {s.name for s in new.services})
            self.cfg, self._keys = new, keys
            release_unused(new, self._locks)
            log.info(
                "reconfigured: added %s, removed %s, changed %s",
                added or "none",
                removed or "none",
                sorted(s.name for s in changed if s.name in old_by_name) or "none",
            )
            return True

    # ------------------------------------------------------------------ health and metrics

    async def _serve_health(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # /whois only on the unix socket (0600): device names and tags are not for the network
        listeners: list[tuple[trio.SocketListener, Handler]] = [
            (
                trio.SocketListener(trio.socket.from_stdlib_socket(bind_unix(self.cfg.health_socket))),
                self._answer_local,
            )
        ]
        if self.cfg.prometheus_addr is not None:
            host, port = self.cfg.prometheus_addr
            tcp = await trio.open_tcp_listeners(port, host=host)
            self.metrics_address = tcp[0].socket.getsockname()[:2]
            log.info("metrics and health on http://%s:%d/metrics", *self.metrics_address)
            listeners += [(listener, self._answer) for listener in tcp]
        await serve_listeners(listeners, task_status=task_status)

    async def _answer_local(self, method: str, target: str) -> Reply:
        if target.split("?", 1)[0] == "/whois":
            return await self.whois(whois_address(target))
        return await self._answer(method, target)

    async def whois(self, addr: str) -> Reply:
        """The engine's per-request question: the node at ``addr``. Always 200; no node headers
        for an unknown address or without a directory (the request then goes on without)."""
        device = await self.directory.lookup(addr) if self.directory is not None else None
        return Reply(200, "text/plain", b"", tuple(node_headers(device)))

    async def _answer(self, method: str, target: str) -> Reply:
        path = target.split("?", 1)[0]
        if path == "/health":
            statuses = await self.statuses()
            healthy = self.engine_up and all(st.state is NodeState.RUNNING for st in statuses)
            body = {
                "healthy": healthy,
                "engine_up": self.engine_up,
                "nodes": [st.as_json() for st in statuses],
            }
            return Reply(200 if healthy else 503, "application/json", json.dumps(body).encode())
        if path == "/status":
            statuses = await self.statuses()
            status: dict[str, object] = {
                "engine_up": self.engine_up,
                "engine_pid": self.engine.pid,
                "engine_restarts": self.restarts,
                "nodes": [
                    {
                        **st.as_json(),
                        "state_dir": self.cfg.service(st.name).node_dir,
                        "listen": self.cfg.service(st.name).listen.port,
                    }
                    for st in statuses
                ],
            }
            if self.directory is not None:
                status["whois_directory"] = self.directory.state.as_json(trio.current_time())
            return Reply(200, "application/json", json.dumps(status).encode())
        if path == "/metrics":
            return Reply(200, "text/plain; version=0.0.4", (await self.metrics_text()).encode())
        return Reply(404, "text/plain", b"not found\n")

    async def metrics_text(self) -> str:
        statuses = await self.statuses()
        traffic = {s.name: self.traffic.get(s.name) or metrics.ServiceTraffic() for s in self.cfg.services}
        return metrics.render(
            engine_up=self.engine_up,
            engine_restarts=self.restarts,
            node_states={st.name: st.state.value for st in statuses},
            traffic=traffic,
        )
