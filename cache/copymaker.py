"""The compressor child process (`python -m cache.copymaker DIR LEVEL MAX_BYTES`): see
`cache.compressor` for why and the protocol. Imports nothing it does not need (no trio), so it
stays small, and ends after a while without jobs (the worker starts it again when needed).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
from collections.abc import Iterator
from pathlib import Path

from .compression import CopyStore, StateDirectoryError, looks_compressible
from .nar import NarError, Segment, nar_segments

IDLE_EXIT = 20.0


def lower_priority() -> None:
    """Idle scheduling (only otherwise-unused CPU), else the lowest nice level."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(19)


def run_job(copies: CopyStore, job: dict[str, object]) -> dict[str, object]:
    nar_hash_hex = str(job["nar_hash"])
    nar_hash = bytes.fromhex(nar_hash_hex)
    root = os.fsencode(str(job["root"]))

    def segments() -> Iterator[Segment]:
        return nar_segments(root)

    answer: dict[str, object] = {"nar_hash": nar_hash_hex}
    found = copies.lookup(nar_hash)
    if found is None:
        try:
            if not looks_compressible(segments()):
                return {**answer, "ok": False, "reason": "incompressible"}
            found = copies.build(nar_hash, segments)
        except StateDirectoryError as exc:
            return {**answer, "ok": False, "reason": exc.reason, "message": str(exc)}
        except (NarError, OSError) as exc:
            return {**answer, "ok": False, "reason": "source", "message": str(exc)}
        if found is None:
            return {**answer, "ok": False, "reason": "busy"}
    return {**answer, "ok": True, "file_hash": found.file_hash.hex(), "file_size": found.file_size}


def child_main(argv: list[str]) -> int:
    directory, level, max_bytes = Path(argv[0]), int(argv[1]), int(argv[2])
    lower_priority()
    copies = CopyStore(directory, level, max_bytes)
    with contextlib.suppress(OSError):
        copies.sweep_copyless()  # once per state directory, here at idle priority
    fd = sys.stdin.fileno()
    pending = b""
    while True:
        if b"\n" not in pending:
            ready, _, _ = select.select([fd], [], [], IDLE_EXIT)
            if not ready:
                return 0  # idle: the worker starts a new one for the next job
            data = os.read(fd, 65536)
            if not data:
                return 0
            pending += data
            continue
        line, pending = pending.split(b"\n", 1)
        try:
            job = json.loads(line)
            answer = run_job(copies, job)
        except Exception as exc:  # a bad job must not end the others
            answer = {"nar_hash": "", "ok": False, "reason": "error", "message": repr(exc)}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
