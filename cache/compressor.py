"""The compressed copies' maker: a child process of each worker, at idle CPU priority.

Compressing a 200 MB NAR takes a core for a second or more; in a separate process at
`SCHED_IDLE` it only ever uses CPU time the workers leave (no GIL shared with the event loop,
no priority inversion), and whatever goes wrong in it (a full or read-only state directory, a
path collected while it is read, a crash) is a line on a pipe for the worker, never an exception
in the worker's event loop.

The child (`cache.copymaker`) is started for the first job and ends after a while without any.
Protocol: the worker writes one JSON job a line to the child's stdin
(`{"nar_hash": hex, "root": path, "size": n}`); the child answers one JSON line each on stdout
(`{"nar_hash": hex, "ok": true, "file_hash": hex, "file_size": n}`, or `"ok": false` with a
`reason`: `busy` (another process makes it), `incompressible`, `source` (the store path could not
be read) or a state directory condition: `full`, `read-only`, `not-writable`, `io-error`).
The child ends when its stdin closes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .compression import CopyIndex, CopyStore
from .metrics import Metrics

log = logging.getLogger("harmonia.compression")

QUEUE = 4096
# after the state directory refused a copy, jobs wait this long before the next attempt
PAUSE_AFTER_REFUSAL = 60.0
RESTART_DELAY = 5.0
STATE_CONDITIONS = ("full", "read-only", "not-writable", "io-error")


def _idle_allowed() -> bool:
    """Whether this process may switch to SCHED_IDLE (a seccomp filter such as systemd's
    `SystemCallFilter=~@resources` refuses it): tried in a throwaway thread, since the policy is
    per thread on Linux and the worker's own must not change."""
    import threading

    allowed: list[bool] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            allowed.append(True)
        except (AttributeError, OSError):
            allowed.append(False)

    thread = threading.Thread(target=probe, name="sched-idle-probe")
    thread.start()
    thread.join()
    return bool(allowed and allowed[0])


def idle_prefix() -> list[str]:
    """Idle scheduling from exec on, so even the interpreter's start never competes with the
    workers; nothing where it is refused (the child then runs at the normal priority)."""
    if shutil.which("chrt") and _idle_allowed():
        return ["chrt", "--idle", "0"]
    return []


# --- the worker's side ----------------------------------------------------------------------


@dataclass
class Job:
    nar_hash: bytes
    root: bytes
    size: int


@dataclass
class Compressor:
    """Feeds jobs to the child process, restarts it if it dies, and turns its answers into the
    worker's knowledge (the copy index), warnings (one per condition) and metrics."""

    copies: CopyStore
    index: CopyIndex
    metrics: Metrics
    on_copy: Callable[[bytes], None] = lambda nar_hash: None
    _send: trio.MemorySendChannel[Job] | None = None
    _pending: set[bytes] = field(default_factory=set)
    _warned: set[str] = field(default_factory=set)
    _settled: set[bytes] = field(default_factory=set)  # no copy will ever be made (incompressible)
    paused_until: float = 0.0
    _prefix: list[str] = field(default_factory=list)
    degraded: str | None = None

    def refusing(self) -> bool:
        """The state directory refused a copy a short while ago: do not try again yet."""
        return time.monotonic() < self.paused_until

    def submit(self, nar_hash: bytes, root: bytes, size: int) -> bool:
        """Queue a copy (never blocks; a full queue or a refusing state directory drops it:
        the path is asked again on a later request)."""
        if (
            self._send is None
            or nar_hash in self._pending
            or nar_hash in self._settled
            or time.monotonic() < self.paused_until
        ):
            return False
        try:
            self._send.send_nowait(Job(nar_hash, root, size))
        except trio.WouldBlock:
            return False
        self._pending.add(nar_hash)
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._prefix = idle_prefix()
        if not self._prefix:
            log.info("compressed copies are made at normal CPU priority: idle scheduling is not allowed here")
        send, receive = trio.open_memory_channel[Job](QUEUE)
        self._send = send
        task_status.started()
        while True:
            first = await receive.receive()  # no process while there is nothing to do
            try:
                await self._serve(first, receive)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._warn_once("process", f"the compressor process failed: {exc}; restarting it")
                await trio.sleep(RESTART_DELAY)
            self._pending.clear()  # jobs it had not answered are asked again by later requests

    async def _serve(self, first: Job, jobs: trio.MemoryReceiveChannel[Job]) -> None:
        args = [str(self.copies.dir), str(self.copies.level), str(self.copies.max_bytes)]
        process = await trio.lowlevel.open_process(
            [*self._prefix, sys.executable, "-m", "cache.copymaker", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert process.stdin is not None and process.stdout is not None
        stdin, stdout = process.stdin, process.stdout

        async def send(job: Job) -> None:
            line = {"nar_hash": job.nar_hash.hex(), "root": os.fsdecode(job.root), "size": job.size}
            await stdin.send_all((json.dumps(line) + "\n").encode())

        try:
            async with trio.open_nursery() as nursery:
                # bounded in flight: the child works one job at a time anyway
                slots = trio.Semaphore(1)

                async def feed() -> None:
                    async for job in jobs:
                        await slots.acquire()
                        await send(job)

                await send(first)
                nursery.start_soon(feed)
                buf = b""
                while True:
                    data = await stdout.receive_some(65536)
                    if not data:
                        code = await process.wait()
                        if code != 0:
                            raise trio.BrokenResourceError(f"it exited with {code}")
                        nursery.cancel_scope.cancel()  # idle: it ended by itself
                        return
                    buf += data
                    *lines, buf = buf.split(b"\n")
                    for raw in lines:
                        if slots.value < 1:
                            slots.release()
                        self._answer(raw)
        finally:
            with trio.CancelScope(shield=True):
                with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    await stdin.aclose()
                with trio.move_on_after(5):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()

    def _answer(self, raw: bytes) -> None:
        try:
            answer = json.loads(raw)
            nar_hash = bytes.fromhex(str(answer.get("nar_hash", "")))
        except ValueError:
            return
        self._pending.discard(nar_hash)
        if answer.get("ok"):
            self.index.forget(nar_hash)
            self.on_copy(nar_hash)
            self.metrics.copy_made()
            # jobs queued before a refusal may still fit (a full disk takes small copies): the
            # condition ends only with a success after the pause, a deliberate retry
            if self.degraded is not None and time.monotonic() >= self.paused_until:
                log.warning(
                    "compressed copies work again under %s (it was %s)", self.copies.dir, self.degraded
                )
                self.degraded = None
                self._warned.difference_update(STATE_CONDITIONS)
                self.metrics.set_degraded(False)
            return
        reason = str(answer.get("reason"))
        if reason in STATE_CONDITIONS:
            # the state directory refused: serve live streams, and try again in a while
            self.metrics.copy_failed()
            self.degraded = reason
            self.metrics.set_degraded(True)
            self.paused_until = time.monotonic() + PAUSE_AFTER_REFUSAL
            self._warn_once(
                reason,
                f"compressed copies disabled for now: {answer.get('message')}; "
                "compressible NARs are compressed on the fly meanwhile",
            )
        elif reason == "incompressible":
            if len(self._settled) > 100_000:
                self._settled.clear()
            self._settled.add(nar_hash)
        elif reason in ("source", "error"):
            self.metrics.copy_failed()
            log.info("no compressed copy of NAR %s: %s", nar_hash.hex()[:16], answer.get("message"))

    def _warn_once(self, condition: str, message: str) -> None:
        if condition not in self._warned:
            self._warned.add(condition)
            log.warning("%s", message)
