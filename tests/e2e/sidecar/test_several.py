"""Several sidecar processes on one host (issue 15), with real nodes on the local tailnet.

The scenario (tests/e2e/sidecar/several.py) starts the real ``harmonia-sidecar`` processes; each
test checks one thing it saw.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.tailnet.netns import Netns, run_in_netns_sync

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("require_real_nodes")]


@pytest.fixture(scope="module")
def seen(netns_module: Netns, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("sidecar-several")
    result: dict[str, Any] = run_in_netns_sync(
        netns_module,
        "tests.e2e.sidecar.several:several_on_one_host",
        {"workdir": str(workdir), "host": netns_module.address},
        timeout=420,
    )
    return result


def test_two_hand_started_sidecars_serve_at_the_same_time(seen: dict[str, Any]) -> None:
    # distinct --state-dir, no TS_STATE_DIR: one default root, an engine directory each
    assert seen["engine_dirs"] == ["_echo", "_harmonia"]
    assert seen["engine_pids"][0] != seen["engine_pids"][1]
    assert seen["both_serve"] == [[True, True]] * 3
    code, printed = seen["status_printed"]
    assert code == 0
    assert "harmonia" in printed and "echo" in printed  # status finds both processes


def test_a_second_sidecar_on_the_same_state_root_is_refused(seen: dict[str, Any]) -> None:
    code, stderr = seen["same_root"]
    assert code == 2
    assert "/shared/_engine" in stderr and "in use by another harmonia-sidecar (pid " in stderr
    assert "TS_STATE_DIR" in stderr and "--config" in stderr
    assert seen["one_still_running"]
    # the same on the default root: a name already running there
    code, stderr = seen["clash"]
    assert code == 2
    assert f"{seen['root']}/_echo" in stderr and "TS_STATE_DIR" in stderr
    assert seen["echo_after_clash"]


def test_restarting_one_leaves_the_other_serving(seen: dict[str, Any]) -> None:
    assert seen["echo_while_harmonia_down"]
    assert seen["after_restart"] == [True, True]
    assert seen["second_engine_pid_unchanged"]


def test_sigterm_stops_cleanly_with_one_and_several_nodes(
    seen: dict[str, Any], record_property: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # exit 0: the process stopped itself (engine included) instead of being killed; the seconds
    # it took are recorded, not asserted (timings are noisy): docs/sidecar.md has the figures
    # that make the unit's TimeoutStopSec (30 s) cover it
    for what in ("stop_one_node", "stop_several_nodes", "stop_one_node_in_flight"):
        code, seconds, engine_gone = seen[what]
        assert code == 0
        assert engine_gone  # nothing left behind holding the nodes' state
        record_property(what + "_seconds", seconds)
        with capsys.disabled():
            print(f"\n{what}: SIGTERM to exit {seconds}s")
