"""The engine lifecycle's transition table, and waiting for a state."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from sidecar.lifecycle import TRANSITIONS, EngineState, Lifecycle, LifecycleError

ALLOWED = {
    (EngineState.STARTING, EngineState.RUNNING),
    (EngineState.STARTING, EngineState.STOPPED),
    (EngineState.RUNNING, EngineState.RESTARTING),
    (EngineState.RUNNING, EngineState.STOPPED),
    (EngineState.RESTARTING, EngineState.RUNNING),
    (EngineState.RESTARTING, EngineState.STOPPED),
}


def at(state: EngineState) -> Lifecycle:
    """A lifecycle walked to ``state`` along allowed transitions."""
    life = Lifecycle()
    path = {
        EngineState.STARTING: [],
        EngineState.RUNNING: [EngineState.RUNNING],
        EngineState.RESTARTING: [EngineState.RUNNING, EngineState.RESTARTING],
        EngineState.STOPPED: [EngineState.STOPPED],
    }[state]
    for step in path:
        life.to(step)
    return life


def test_the_table_is_the_charter() -> None:
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == ALLOWED
    assert set(TRANSITIONS) == set(EngineState)


@pytest.mark.parametrize(("start", "end"), list(itertools.product(EngineState, EngineState)))
def test_every_transition_is_allowed_or_refused(start: EngineState, end: EngineState) -> None:
    life = at(start)
    if (start, end) in ALLOWED:
        life.to(end)
        assert life.state is end
        assert life.engine_up is (end is EngineState.RUNNING)
    else:
        with pytest.raises(LifecycleError, match=f"{start.value} -> {end.value}"):
            life.to(end)
        assert life.state is start


def test_restarts_count_deaths_of_a_running_engine() -> None:
    life = Lifecycle()
    life.to(EngineState.RUNNING)
    for _ in range(3):
        life.to(EngineState.RESTARTING)
        life.to(EngineState.RUNNING)
    life.to(EngineState.STOPPED)
    assert life.restarts == 3


async def test_waiting_for_a_state() -> None:
    life = Lifecycle()
    reached: list[EngineState] = []

    async def waiter() -> None:
        reached.append(await life.wait_for(EngineState.RESTARTING, EngineState.STOPPED))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            life.to(EngineState.RUNNING)  # not what it waits for
            await trio.testing.wait_all_tasks_blocked()
            assert reached == []
            life.to(EngineState.RESTARTING)
        assert reached == [EngineState.RESTARTING]
        assert await life.wait_for(EngineState.RESTARTING) is EngineState.RESTARTING  # at once
