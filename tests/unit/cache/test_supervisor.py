"""The supervisor's restart policy: pure, tested without processes (the e2e side is in tests/e2e/faults)."""

from __future__ import annotations

import pytest

from cache.server import HEALTHY_ENV, HEALTHY_SECONDS, RestartBackoff, healthy_seconds


def test_backoff_doubles_up_to_the_ceiling_while_a_slot_keeps_crashing() -> None:
    backoff = RestartBackoff()
    assert [backoff.delay(0, uptime=0.1) for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_a_healthy_run_resets_the_backoff() -> None:
    backoff = RestartBackoff(healthy=30)
    assert [backoff.delay(0, 1.0) for _ in range(4)] == [0.5, 1, 2, 4]
    assert backoff.delay(0, 29.9) == 8  # not healthy yet
    assert backoff.delay(0, 30.0) == 0.5  # ran 30 s: healthy
    assert backoff.delay(0, 2.0) == 1


def test_slots_back_off_independently() -> None:
    backoff = RestartBackoff()
    assert [backoff.delay(0, 0) for _ in range(3)] == [0.5, 1, 2]
    assert backoff.delay(1, 0) == 0.5


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, HEALTHY_SECONDS),
        ("2.5", 2.5),
        ("0", HEALTHY_SECONDS),
        ("-1", HEALTHY_SECONDS),
        ("x", HEALTHY_SECONDS),
    ],
)
def test_healthy_seconds_from_the_environment(raw: str | None, expected: float) -> None:
    env = {} if raw is None else {HEALTHY_ENV: raw}
    assert healthy_seconds(env) == expected
