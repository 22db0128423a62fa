"""Listening sockets, the accept loop, worker processes, signals and systemd integration.

One process binds (or takes socket-activated sockets), then forks `workers` children that share
the listening sockets. Each child runs trio: it accepts, detects the protocol (HTTP/1.1, h2c prior
knowledge, TLS with ALPN) and serves. The parent reports readiness (`READY=1`) once every child
is serving, pings the watchdog, restarts a child that dies (with a backoff that resets after a
healthy run), and on SIGTERM/SIGINT stops them gracefully: they stop accepting and let running
transfers finish within a grace period.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import trio

from .app import App
from .config import Config
from .keys import read_secret_key
from .metrics import Metrics
from .signing import Signer
from .store import StoreError
from .systemd import listen_fds, notify, watchdog_interval
from .transport.h1server import H1Connection
from .transport.h2server import PREFACE as H2_PREFACE
from .transport.h2server import H2Connection

log = logging.getLogger("harmonia.server")

# accept() failing for lack of resources: wait a moment and retry (trio's ACCEPT_CAPACITY_ERRNOS)
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF = 0.1
# accept() failing because that one connection is already gone (Linux reports some network errors
# of the pending connection here, see accept(2)): take the next
ACCEPT_GONE_ERRNOS = frozenset(
    {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
     errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH}
)  # fmt: skip
TLS_HANDSHAKE_TIMEOUT = 10.0
GRACE_SECONDS = 10.0
LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn; bursts wait here, not dropped


@dataclass(frozen=True)
class Prepared:
    """What the parent sets up once, before any worker starts."""

    config: Config
    sockets: list[socket.socket]
    signers: list[Signer]
    metrics: Metrics

    @property
    def urls(self) -> list[str]:
        return [socket_url(s, self.config.tls) for s in self.sockets]


def socket_url(sock: socket.socket, tls: bool) -> str:
    scheme = "https" if tls else "http"
    if sock.family == socket.AF_UNIX:
        return f"{scheme}+unix://{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    if sock.family == socket.AF_INET6:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def open_sockets(config: Config) -> list[socket.socket]:
    activated = listen_fds()
    if activated:
        return activated
    bind = config.bind
    if bind.unix_path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(bind.unix_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(bind.unix_path)
        os.chmod(bind.unix_path, 0o666)
    else:
        assert bind.host is not None and bind.port is not None
        family = socket.AF_INET6 if ":" in bind.host else socket.AF_INET
        if bind.host == "localhost":
            family = socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # "[::]" serves IPv4 too, as harmonia's default bind does
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((bind.host if bind.host != "localhost" else "127.0.0.1", bind.port))
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return [sock]


def load_signers(config: Config) -> list[Signer]:
    return [read_secret_key(path).signer() for path in config.sign_key_paths]


def prepare(config: Config) -> Prepared:
    signers = load_signers(config)
    sockets = open_sockets(config)
    return Prepared(config, sockets, signers, Metrics(config.workers))


def tls_context(config: Config) -> ssl.SSLContext | None:
    if not config.tls:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    assert config.tls_cert_path is not None and config.tls_key_path is not None
    ctx.load_cert_chain(str(config.tls_cert_path), str(config.tls_key_path))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


ACCEPT_BATCH = 64  # connections accepted in a row before other tasks run
# Workers share one listening socket and all wake for a new connection; the first to accept wins,
# so one worker could take every keep-alive connection of a client while the other core idles.
# A worker holding BALANCE_SLACK more connections than another lets that one try first.
BALANCE_SLACK = 1
BALANCE_DEFER = 0.0005


def dead_on_arrival(sock: socket.socket) -> bool:
    """A connection its client already reset or closed without sending a byte: a connect flood's
    connection costs one peek and a close, never a task."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False  # open, nothing sent yet: a normal client about to speak
    except OSError:
        return True  # ECONNRESET and friends


class Worker:
    def __init__(self, app: App, config: Config) -> None:
        self.app = app
        self.config = config
        self.ssl = tls_context(config)
        self.slots = trio.Semaphore(config.max_connections)
        self.stopping = trio.Event()
        self.idle: set[trio.CancelScope] = set()
        # harmonia's (actix's) meaning of max_connection_rate: TLS handshakes in progress at once
        # per worker, which bounds the CPU spent on handshakes; it is not a rate of connections
        self.handshakes = trio.Semaphore(config.max_connection_rate)

    async def accept_loop(self, listener: socket.socket, conns: trio.Nursery) -> None:
        """Accept as fast as connections come, in batches: a connection the kernel cannot queue is
        a normal client's dropped SYN, so the queue is drained rather than rate limited. Reset
        connections are dropped before they cost a task; at max_connections accepting pauses
        (connections wait in the kernel's queue, where the other workers may take them)."""
        batch = 0
        warned = 0.0
        while True:
            try:
                self.slots.acquire_nowait()  # no scheduling round per connection
            except trio.WouldBlock:
                await self.slots.acquire()  # max_connections open: stop accepting until one closes
            if self.app.metrics.fewer_connections_elsewhere(BALANCE_SLACK):
                await trio.sleep(BALANCE_DEFER)
            try:
                raw, addr = listener.accept()
            except BlockingIOError:
                self.slots.release()
                batch = 0
                await trio.lowlevel.wait_readable(listener)
                continue
            except OSError as exc:
                self.slots.release()
                if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                    # out of descriptors or memory: running connections will free some
                    if time.monotonic() - warned > 10:  # once per 10 s, not once per connection
                        warned = time.monotonic()
                        log.warning("accept failed, retrying in %.1fs: %s", ACCEPT_BACKOFF, exc)
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                if exc.errno in ACCEPT_GONE_ERRNOS:
                    continue  # the client left before we accepted: nothing to do
                # the listening socket itself is broken (EBADF, EINVAL…): end this worker, whose
                # supervisor starts a fresh one
                log.error("accept failed on the listening socket: %s", exc)
                raise
            if dead_on_arrival(raw):
                raw.close()
                self.slots.release()
            else:
                # counted at once, not when its task first runs: the balance between workers reads it
                self.app.metrics.connection_opened()
                conns.start_soon(self.connection, trio.socket.from_stdlib_socket(raw), addr)
            batch += 1
            if batch >= ACCEPT_BATCH:
                batch = 0
                await trio.lowlevel.checkpoint()

    async def connection(self, sock: trio.socket.SocketType, addr: object) -> None:
        client = addr[0] if isinstance(addr, tuple) else "unix"
        try:
            stream = trio.SocketStream(sock)
            if self.ssl is not None:
                await self._tls(stream, str(client))
            else:
                await self._plain(stream, str(client))
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass
        except Exception:
            log.exception("connection from %s failed", client)
        finally:
            self.app.metrics.connection_closed()
            self.slots.release()
            sock.close()

    async def _plain(self, stream: trio.SocketStream, client: str) -> None:
        data = b""
        with trio.move_on_after(30) as scope:
            self.idle.add(scope)  # nothing asked yet: shutdown may drop it at once
            try:
                while True:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    data += chunk
                    # decide as soon as the bytes cannot be the HTTP/2 preface, or are it
                    if not H2_PREFACE.startswith(data[: len(H2_PREFACE)]) or len(data) >= len(H2_PREFACE):
                        break
            finally:
                self.idle.discard(scope)
        if not data:
            return
        if data.startswith(H2_PREFACE):
            await H2Connection(
                stream, self.app.handle, self.app.metrics, client=client, prefix=data, stopping=self.stopping
            ).run()
            return
        await H1Connection(
            stream,
            self.app.handle,
            self.app.metrics,
            sock=stream.socket,
            client=client,
            prefix=data,
            idle=self.idle,
            stopping=self.stopping,
        ).run()

    async def _tls(self, stream: trio.SocketStream, client: str) -> None:
        assert self.ssl is not None
        tls = trio.SSLStream(stream, self.ssl, server_side=True)
        try:
            async with self.handshakes:  # max_connection_rate handshakes at once
                with trio.fail_after(TLS_HANDSHAKE_TIMEOUT):
                    await tls.do_handshake()
        except (trio.TooSlowError, trio.BrokenResourceError):
            return
        if tls.selected_alpn_protocol() == "h2":
            await H2Connection(
                tls, self.app.handle, self.app.metrics, client=client, stopping=self.stopping
            ).run()
            return
        await H1Connection(
            tls,
            self.app.handle,
            self.app.metrics,
            sock=None,
            client=client,
            idle=self.idle,
            stopping=self.stopping,
        ).run()

    async def serve(
        self, sockets: list[socket.socket], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept until SIGTERM/SIGINT; then drain connections for the grace period.

        A second signal during the drain ends the remaining transfers at once.
        """
        listeners = [s.dup() for s in sockets]
        for listener in listeners:
            listener.setblocking(False)
        stop = trio.Event()
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as outer:
                await outer.start(self.app.run_background)
                async with trio.open_nursery() as conns:
                    outer.start_soon(self._watch_signals, signals, stop, conns.cancel_scope)
                    async with trio.open_nursery() as accepting:
                        for listener in listeners:
                            accepting.start_soon(self.accept_loop, listener, conns)
                        task_status.started()
                        await stop.wait()
                        accepting.cancel_scope.cancel()
                    for listener in listeners:
                        listener.close()
                    self.stopping.set()
                    for scope in list(self.idle):
                        scope.cancel()
                    conns.cancel_scope.deadline = trio.current_time() + GRACE_SECONDS
                outer.cancel_scope.cancel()
        await self.app.aclose()

    @staticmethod
    async def _watch_signals(signals: AsyncIterator[int], stop: trio.Event, conns: trio.CancelScope) -> None:
        async for signum in signals:
            if not stop.is_set():
                log.info(
                    "received %s: finishing running requests (up to %ss)",
                    signal.Signals(signum).name,
                    GRACE_SECONDS,
                )
                stop.set()
            else:
                log.info("received %s again: stopping now", signal.Signals(signum).name)
                conns.cancel()


async def serve_in_process(
    prepared: Prepared,
    slot: int = 0,
    on_ready: Callable[[], None] | None = None,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """One worker in this process: what each child runs, and the whole server when workers=1."""
    prepared.metrics.use_slot(slot)
    app = App(prepared.config, prepared.signers, prepared.metrics)
    worker = Worker(app, prepared.config)
    if slot == 0:
        await _probe_store(app)
    async with trio.open_nursery() as nursery:

        async def serve_then_stop(*, task_status: trio.TaskStatus[None]) -> None:
            await worker.serve(prepared.sockets, task_status=task_status)
            nursery.cancel_scope.cancel()

        await nursery.start(serve_then_stop)
        if on_ready is not None:
            on_ready()
        task_status.started(prepared.urls)
        interval = watchdog_interval() if prepared.config.workers == 1 else None
        if interval:
            nursery.start_soon(_watchdog, interval)


async def _probe_store(app: App) -> None:
    """Say at start, once, when the store cannot be read: every request would answer 503."""
    try:
        with trio.fail_after(10):
            await app.store.path_from_hash_part("0" * 32)
    except StoreError as exc:
        hint = ""
        if app.config.store_backend == "db" and "readonly" in str(exc):
            hint = (
                " (a non-root reader of Nix's WAL-mode database fails when no Nix process holds it open;"
                ' store_backend = "daemon" reads through the nix-daemon instead)'
            )
        elif app.config.store_backend == "db":
            hint = f" (check nix_db_path = {app.config.nix_db_path}: is Nix installed, and has it run once?)"
        log.error("the store cannot be read: %s%s", exc, hint)
    except trio.TooSlowError:
        log.error("the store did not answer within 10 s")


async def _watchdog(interval: float) -> None:
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(interval)


def announce(prepared: Prepared) -> None:
    for url in prepared.urls:
        log.info("listening on %s", url)
    notify(f"READY=1\nSTATUS=Serving on {' '.join(prepared.urls)}")


def run(config: Config) -> int:
    """Serve until SIGTERM/SIGINT. Returns the exit status."""
    prepared = prepare(config)
    if config.workers == 1:
        signal.signal(signal.SIGHUP, _sighup)  # as with workers: logged, and the server keeps serving
        trio.run(serve_in_process, prepared, 0, lambda: announce(prepared))
        return 0
    return WorkerSupervisor(prepared).run()


BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
HEALTHY_SECONDS = 30.0
HEALTHY_ENV = "HARMONIA_WORKER_HEALTHY_SECONDS"  # tuning (and tests): what counts as a healthy run


def _sighup(signum: int, frame: object) -> None:
    log.info(SIGHUP_MESSAGE)


SIGHUP_MESSAGE = "received SIGHUP: nothing to reload (configuration and keys are read at start)"


class RestartBackoff:
    """How long to wait before restarting a worker that died, per worker slot.

    The delay doubles from 0.5 s up to 30 s while a slot keeps dying soon after it starts (a crash
    loop must not burn the CPU); a worker that ran `healthy` seconds or more before it died was
    healthy, and its slot starts again from 0.5 s.
    """

    def __init__(
        self, first: float = BACKOFF_FIRST, ceiling: float = BACKOFF_MAX, healthy: float = HEALTHY_SECONDS
    ) -> None:
        self.first = first
        self.ceiling = ceiling
        self.healthy = healthy
        self._next: dict[int, float] = {}

    def delay(self, slot: int, uptime: float) -> float:
        if uptime >= self.healthy:
            self._next.pop(slot, None)
        delay = self._next.get(slot, self.first)
        self._next[slot] = min(delay * 2, self.ceiling)
        return delay


def healthy_seconds(environ: Mapping[str, str] = os.environ) -> float:
    raw = environ.get(HEALTHY_ENV)
    if raw is None:
        return HEALTHY_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 86400:
        log.warning(
            "%s=%r is not a number of seconds in (0, 86400]; using %.0f", HEALTHY_ENV, raw, HEALTHY_SECONDS
        )
        return HEALTHY_SECONDS
    return value


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class WorkerSupervisor:
    """The parent of the worker processes.

    One loop waits for signals with a deadline (never a blocking sleep), so SIGTERM, SIGINT and
    SIGHUP are answered at once, also while a worker's restart is pending; a restarted worker's
    readiness is polled, never waited for.
    """

    HANDLED = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP})

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared
        self.children: dict[int, int] = {}  # pid -> slot
        self.started: dict[int, float] = {}  # pid -> when it was forked (monotonic)
        self.starting: dict[int, int] = {}  # pid -> read end of its readiness pipe
        self.pending: dict[int, float] = {}  # slot -> when its restart is due (monotonic)
        self.backoff = RestartBackoff(healthy=healthy_seconds())

    def _spawn(self, slot: int) -> tuple[int, int]:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(read_fd)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the parent owns the workers' lifecycle
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            code = 0

            def ready() -> None:
                os.write(write_fd, b"1")
                os.close(write_fd)

            try:
                trio.run(serve_in_process, self.prepared, slot, ready)
            except BaseException:
                log.exception("worker %d failed", slot)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(write_fd)
        self.children[pid] = slot
        self.started[pid] = time.monotonic()
        return pid, read_fd

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, self.HANDLED)
        pipes = [self._spawn(slot) for slot in range(self.prepared.config.workers)]
        for pid, fd in pipes:
            ok = os.read(fd, 1) == b"1"
            os.close(fd)
            if not ok:
                log.error("worker %d did not start", pid)
                self._stop_all()
                return 1
        announce(self.prepared)
        interval = watchdog_interval()
        next_ping = time.monotonic()
        while True:
            now = time.monotonic()
            if interval and now >= next_ping:
                notify("WATCHDOG=1")
                next_ping = now + interval
            self._start_due(now)
            self._poll_starting()
            info = signal.sigtimedwait(self.HANDLED, self._wait_time(now, next_ping if interval else None))
            if info is None:
                continue
            if info.si_signo in (signal.SIGTERM, signal.SIGINT):
                log.info(
                    "received %s: stopping the workers (running requests get up to %ss)",
                    signal.Signals(info.si_signo).name,
                    GRACE_SECONDS,
                )
                notify("STOPPING=1")
                self.pending.clear()
                return self._stop_all()
            if info.si_signo == signal.SIGHUP:
                log.info(SIGHUP_MESSAGE)
            elif info.si_signo == signal.SIGCHLD:
                self._schedule_restarts()

    def _wait_time(self, now: float, next_ping: float | None) -> float:
        deadlines = [now + 3600.0]
        if next_ping is not None:
            deadlines.append(next_ping)
        deadlines.extend(self.pending.values())
        if self.starting:
            deadlines.append(now + 0.1)  # readiness of a restarted worker is polled
        return max(0.0, min(deadlines) - now)

    def _schedule_restarts(self) -> None:
        now = time.monotonic()
        for pid, slot, status in self._reap():
            uptime = now - self.started.pop(pid, now)
            delay = self.backoff.delay(slot, uptime)
            log.error(
                "worker %d (pid %d) %s after %.1fs; restarting it in %.1fs",
                slot,
                pid,
                describe_exit(status),
                uptime,
                delay,
            )
            self.pending[slot] = now + delay

    def _start_due(self, now: float) -> None:
        for slot, due in sorted(self.pending.items()):
            if due <= now:
                del self.pending[slot]
                pid, fd = self._spawn(slot)
                self.starting[pid] = fd

    def _poll_starting(self) -> None:
        if not self.starting:
            return
        readable, _, _ = select.select(list(self.starting.values()), [], [], 0)
        for pid, fd in list(self.starting.items()):
            if fd in readable:
                if os.read(fd, 1) == b"1":
                    log.info("worker %d (pid %d) is serving again", self.children.get(pid, -1), pid)
                os.close(fd)
                del self.starting[pid]

    def _reap(self) -> list[tuple[int, int, int]]:
        dead = []
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            slot = self.children.pop(pid, None)
            fd = self.starting.pop(pid, None)
            if fd is not None:
                os.close(fd)
            if slot is not None:
                dead.append((pid, slot, status))
        return dead

    def _stop_all(self) -> int:
        """SIGTERM to every worker; they drain for the grace period. A second SIGTERM/SIGINT is
        passed on (the workers then end their transfers at once); past the grace period, SIGKILL."""
        self._signal_children(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_SECONDS + 5
        while self.children and time.monotonic() < deadline:
            self._reap()
            if not self.children:
                break
            info = signal.sigtimedwait(self.HANDLED, min(0.5, max(0.0, deadline - time.monotonic())))
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                log.info("received %s again: stopping now", signal.Signals(info.si_signo).name)
                self._signal_children(signal.SIGTERM)
        if self.children:
            log.error(
                "workers %s did not stop within %.0fs: killing them", sorted(self.children), GRACE_SECONDS + 5
            )
            self._signal_children(signal.SIGKILL)
            for pid in list(self.children):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        for fd in self.starting.values():
            os.close(fd)
        self.starting.clear()
        return 0

    def _signal_children(self, signum: int) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
