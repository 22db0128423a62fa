"""Run harmonia-cache as a child process and learn where it listens.

For the benchmark and the tests (and anyone scripting the server): the server binds port 0 and
says `listening on URL` on stderr once it is ready; this waits for that line.
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

READY = re.compile(r"listening on (\S+)")


@dataclass
class Launched:
    url: str
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)  # everything the server logged so far

    @property
    def log(self) -> str:
        return "".join(self.lines)


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
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        pumping.join(5)
        if proc.stderr is not None:
            proc.stderr.close()
