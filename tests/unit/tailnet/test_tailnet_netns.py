"""The namespace machinery other tailnet tests build on (needs root and `ip`; skips otherwise)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from tests.tailnet import netns as netns_mod
from tests.tailnet.netns import ChildFailed, Netns, netns, run_in_netns, run_in_netns_sync


def interfaces(extra: int = 0) -> dict[str, object]:
    """Runs inside the namespace: what this process sees."""
    return {"names": sorted(name for _, name in socket.if_nameindex()), "extra": extra}


async def fails() -> None:
    """Runs inside the namespace and fails."""
    await trio.lowlevel.checkpoint()
    raise RuntimeError("scenario went wrong on purpose")


async def sleeps_forever() -> None:
    await trio.sleep_forever()


@pytest.fixture
def ns() -> Iterator[Netns]:
    reason = netns_mod.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with netns("hbtest") as made:
        yield made


def test_unavailable_reason_names_the_missing_tool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda _: None)
    assert "`ip`" in (netns_mod.unavailable_reason() or "")
    with pytest.raises(netns_mod.NetnsUnavailable), netns():
        pass


def test_namespace_is_wired_and_removed(ns: Netns) -> None:
    addrs = ns.run(["ip", "-4", "-o", "addr"]).stdout
    assert f"{ns.address}/24" in addrs and f"{ns.peer_address}/24" in addrs
    assert "127.0.0.1/8" in addrs
    assert ns.run(["ip", "route"]).stdout.startswith(f"default via {ns.peer_address} dev veth0")
    assert (
        ns.name
        in subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=True, timeout=10
        ).stdout
    )


def test_namespace_is_gone_after_the_block() -> None:
    if netns_mod.unavailable_reason() is not None:
        pytest.skip(netns_mod.unavailable_reason() or "")
    with netns("hbtest") as made:
        name = made.name
    listed = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    assert name not in listed


async def test_run_in_netns_runs_python_inside(ns: Netns) -> None:
    with trio.fail_after(30):
        seen = await run_in_netns(ns, f"{__name__}:interfaces", {"extra": 3})
    assert seen == {"names": ["lo", "veth0", "veth1"], "extra": 3}
    seen = run_in_netns_sync(ns, f"{__name__}:interfaces", timeout=30)
    assert seen["names"] == ["lo", "veth0", "veth1"]


async def test_run_in_netns_reports_failures_and_timeouts(ns: Netns) -> None:
    with trio.fail_after(30), pytest.raises(ChildFailed, match="on purpose"):
        await run_in_netns(ns, f"{__name__}:fails")
    with pytest.raises(ChildFailed, match="timed out"):
        run_in_netns_sync(ns, f"{__name__}:sleeps_forever", timeout=1)
    with trio.move_on_after(1) as scope:
        await run_in_netns(ns, f"{__name__}:sleeps_forever")
    assert scope.cancelled_caught


def reports_then_waits(marker: str) -> None:
    """Runs inside the namespace: says it is ready, then runs until its stdin closes."""
    import sys
    from pathlib import Path

    netns_mod.report_ready({"names": sorted(name for _, name in socket.if_nameindex())})
    sys.stdin.read()
    Path(marker).write_text("stopped cleanly")


def test_background_in_netns_yields_the_ready_line_and_stops_the_child(ns: Netns, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    argv = [sys.executable, "-m", "tests.tailnet.child", f"{__name__}:reports_then_waits"]
    argv.append(json.dumps({"marker": str(marker)}))
    with netns_mod.background_in_netns(
        ns, argv, ready_prefix=netns_mod.READY_PREFIX, log_path=tmp_path / "log", timeout=30
    ) as line:
        assert json.loads(line)["names"] == ["lo", "veth0", "veth1"]
        assert not marker.exists()
    assert marker.read_text() == "stopped cleanly"  # stdin closed: it ended on its own


def test_background_in_netns_that_never_gets_ready_fails_with_its_log(ns: Netns, tmp_path: Path) -> None:
    argv = [
        sys.executable,
        "-c",
        "import sys, time; print('starting', file=sys.stderr, flush=True); time.sleep(60)",
    ]
    with (
        pytest.raises(ChildFailed, match=r"did not get ready within 1\.5s(.|\n)*starting"),
        netns_mod.background_in_netns(
            ns,
            argv,
            ready_prefix=netns_mod.READY_PREFIX,
            log_path=tmp_path / "log",
            timeout=1.5,
            stop_grace=1,
        ),
    ):
        pass
