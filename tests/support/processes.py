"""Child processes of async tests, stopped the same way everywhere."""

from __future__ import annotations

import trio


async def stop_process(proc: trio.Process, grace: float = 15) -> int | None:
    """SIGTERM, SIGKILL after `grace` seconds, reaped; shielded, so a cancelled test still cleans
    up. Returns the exit status."""
    with trio.CancelScope(shield=True):
        if proc.returncode is None:
            proc.terminate()
            with trio.move_on_after(grace):
                await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode
