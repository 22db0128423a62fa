"""The engine's lifecycle under the supervisor: one state, its transitions in one table.

Charter (h11's ``_state.py`` pattern: the rules first, then the table that enforces them):

- ``STARTING``: the first engine is being started and configured. Nothing is served yet.
- ``RUNNING``: an engine runs with the configuration applied (its nodes may still be joining
  the tailnet: that is each node's own state, see ``engine.NodeState``).
- ``RESTARTING``: the running engine died (or could not be configured again); the supervisor
  waits out its backoff and starts another. Health answers 503 meanwhile.
- ``STOPPED``: supervision ended (the sidecar is stopping, or the very first start failed,
  which is reported to the caller instead of retried). Final.

Every change goes through :meth:`Lifecycle.to`, which refuses a transition the table does not
list (a supervisor bug, not a runtime condition), counts restarts, and wakes whoever waits for
a state. Pure bookkeeping plus trio events: no I/O here.
"""

from __future__ import annotations

from enum import Enum

import trio


class EngineState(Enum):
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPED = "stopped"


#: state -> the states it may change to
TRANSITIONS: dict[EngineState, frozenset[EngineState]] = {
    EngineState.STARTING: frozenset({EngineState.RUNNING, EngineState.STOPPED}),
    EngineState.RUNNING: frozenset({EngineState.RESTARTING, EngineState.STOPPED}),
    EngineState.RESTARTING: frozenset({EngineState.RUNNING, EngineState.STOPPED}),
    EngineState.STOPPED: frozenset(),
}


class LifecycleError(RuntimeError):
    """A transition the table does not allow: a bug in the supervisor."""


class Lifecycle:
    """The engine's current :class:`EngineState`, its restarts, and waiting for a state."""

    def __init__(self) -> None:
        self.state = EngineState.STARTING
        self.restarts = 0  # RUNNING -> RESTARTING transitions
        self._changed = trio.Event()

    @property
    def engine_up(self) -> bool:
        return self.state is EngineState.RUNNING

    def to(self, new: EngineState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise LifecycleError(f"engine lifecycle: {self.state.value} -> {new.value} is not a transition")
        if new is EngineState.RESTARTING:
            self.restarts += 1
        self.state = new
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, *states: EngineState) -> EngineState:
        """Until the state is one of ``states`` (at once if it is now); the state reached."""
        while self.state not in states:
            await self._changed.wait()
        return self.state
