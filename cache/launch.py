"""Run harmonia-cache as a child process and learn where it listens, and a nix-daemon for it.

For the benchmark and the tests (and anyone scripting the server): the server binds port 0 and
says `listening on URL` on stderr once it is ready; this waits for that line. The `daemon`
backend (the systemd unit's) needs a nix-daemon: `nix_daemon` uses the machine's or starts one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

READY = re.compile(r"listening on (\S+)")


@dataclass
class Launched:
    url: str
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)  # everything the server logged so far

    @property
    def log(self) -> str:
        return "".join(self.lines)


def stop(proc: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds, and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def running(
    config_file: Path,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 30,
    cwd: Path | None = None,
    netns: str | None = None,
) -> Iterator[Launched]:
    """`python -m cache --config FILE` until the block ends (SIGTERM, then SIGKILL after 15 s);
    inside network namespace `netns` if given (`ip netns exec` execs, so the pid is the server's)."""
    proc_env = dict(os.environ if env is None else env)
    proc_env.pop("CONFIG_FILE", None)  # the file given here is the configuration
    proc = subprocess.Popen(
        [
            *(["ip", "netns", "exec", netns] if netns else []),
            sys.executable,
            "-m",
            "cache",
            "--config",
            str(config_file),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=proc_env,
        cwd=cwd,
    )
    lines: list[str] = []
    found: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if not found and (m := READY.search(line)):
                found.append(m.group(1))
                ready.set()
        ready.set()

    pumping = threading.Thread(target=pump, daemon=True)
    pumping.start()
    try:
        deadline = time.monotonic() + timeout
        while not found:
            if proc.poll() is not None:
                pumping.join(2)
                raise RuntimeError(f"harmonia-cache exited {proc.returncode}:\n{''.join(lines)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"harmonia-cache not ready after {timeout}s:\n{''.join(lines)}")
            ready.wait(0.1)
        yield Launched(found[0], proc, lines)
    finally:
        stop(proc, 15)
        pumping.join(5)
        if proc.stderr is not None:
            proc.stderr.close()


DAEMON_SOCKET = Path("/nix/var/nix/daemon-socket/socket")


def daemon_answers(env: Mapping[str, str]) -> bool:
    probe = dict(env, NIX_REMOTE="daemon")
    try:
        proc = subprocess.run(
            ["nix", "store", "ping"], env=probe, capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


@contextmanager
def nix_daemon(state: Path, env: Mapping[str, str]) -> Iterator[None]:
    """The machine's nix-daemon if one answers; otherwise one started here (its log in `state`)
    and stopped when the block ends."""
    if daemon_answers(env):
        yield
        return
    if DAEMON_SOCKET.exists():
        DAEMON_SOCKET.unlink()  # a stale socket from an earlier run refuses connections
    state.mkdir(parents=True, exist_ok=True)
    log_path = state / "nix-daemon.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["nix-daemon"], env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 30
            while not daemon_answers(env):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nix-daemon did not start; see {log_path}")
                time.sleep(0.1)
            yield
        finally:
            stop(proc, 10)
