"""The bench's report from a recorded quick run: targets, the table with the shaped-link phase, the chart."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench.report import check_targets, paired_ratio, render_chart, render_table, shaped_ratio

RUN = Path(__file__).with_name("quick_run.json")


def _report() -> dict[str, Any]:
    report: dict[str, Any] = json.loads(RUN.read_text())
    return report


def test_targets_cover_both_backends_and_both_clients() -> None:
    report = _report()
    targets = {t["name"]: t for t in check_targets(report["results"], report["shaped"])}
    assert targets["narinfo requests/s vs Caddy, db backend"]["target"] == 0.8
    assert targets["narinfo requests/s vs Caddy, daemon backend"]["target"] == 0.7
    for client in ("nix-2.8", "nix-2.26"):
        for backend in ("daemon", "db"):
            first = targets[f"shaped link, {client}, {backend} backend: first vs Caddy zstd export"]
            times = report["shaped"]["clients"][client]
            expected = times["caddy-zstd"]["first"] / times[f"ours-{backend}"]["first"]
            assert math.isclose(first["value"], expected, abs_tol=1e-3)
            assert first["met"] == (expected >= 0.9)


def test_a_missing_client_is_a_missed_target_not_a_pass() -> None:
    report = _report()
    del report["shaped"]["clients"]["nix-2.26"]
    targets = check_targets(report["results"], report["shaped"])
    missing = [t for t in targets if "nix-2.26" in t["name"]]
    assert missing and all(t["value"] is None and not t["met"] for t in missing)


def test_table_shows_the_shaped_phase() -> None:
    report = _report()
    report["targets"] = check_targets(report["results"], report["shaped"])
    table = render_table(report)
    assert "| first fetch of a fresh 20 MB path, once every server has it | nix-2.26 |" in table
    assert "daemon backend" in table and "Caddy, zstd export" in table
    ratio = shaped_ratio(report["shaped"]["clients"]["nix-2.8"], "ours-db", "closure")
    assert f"{ratio:.2f}×" in table
    only_shaped = dict(report, results={})
    only_shaped["targets"] = check_targets({}, report["shaped"])
    assert "shaped link, nix-2.8" in render_table(only_shaped)


def test_chart(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    report = _report()
    render_chart(report, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 10_000


def test_table_says_how_many_first_fetches_found_no_copy() -> None:
    report = _report()
    report["shaped"]["rounds"] = 3
    report["shaped"]["first_without_copy"] = {
        "nix-2.8": {"ours-daemon": 0, "ours-db": 1},
        "nix-2.26": {"ours-daemon": 2, "ours-db": 0},
    }
    report["targets"] = check_targets(report["results"], report["shaped"])
    table = render_table(report)
    assert "nix-2.8: daemon 0/3, db 1/3; nix-2.26: daemon 2/3, db 0/3" in table


def test_paired_ratio_is_the_median_of_fetch_by_fetch_ratios_and_shown_beside() -> None:
    samples = {
        # the same closures in the same order for every server: round 2 was slow for everyone
        "caddy-zstd": {"closure": [0.40, 0.60, 0.40], "first": [0.30, 0.30, 0.30]},
        "ours-db": {"closure": [0.38, 0.58, 0.41], "at_once": [0.60, 0.15, 0.30]},
    }
    assert math.isclose(paired_ratio(samples, "ours-db", "closure"), 0.60 / 0.58)
    assert math.isclose(paired_ratio(samples, "ours-db", "at_once"), 1.0)  # against Caddy's first fetch
    assert math.isnan(paired_ratio(samples, "ours-db", "again"))
    report = _report()
    report["shaped"]["samples"] = {"nix-2.8": dict(samples, **{"ours-daemon": samples["ours-db"]})}
    report["targets"] = check_targets(report["results"], report["shaped"])
    table = render_table(report)
    assert "| paired daemon | paired db |" in table
    client_samples = report["shaped"]["samples"]["nix-2.8"]
    paired = paired_ratio(client_samples, "ours-db", "closure")
    row = next(line for line in table.splitlines() if line.startswith("| a ") and "| nix-2.8 |" in line)
    assert row.rstrip(" |").endswith(f"{paired:.2f}×")


def test_closures_built_before_the_servers_have_their_own_row_and_no_target() -> None:
    report = _report()
    for times in report["shaped"]["clients"].values():
        for server, caddy_or_ours in times.items():
            caddy_or_ours["closure_old"] = 0.5 if server.startswith("ours") else 0.4
    report["targets"] = check_targets(report["results"], report["shaped"])
    table = render_table(report)
    row = next(line for line in table.splitlines() if "built before the servers started" in line)
    assert "| 0.80× | 0.80× |" in row
    assert not any("closure_old" in t["name"] or "built before" in t["name"] for t in report["targets"])


def test_table_counts_first_fetches_and_closures_apart() -> None:
    report = _report()
    report["shaped"].update(rounds=5, samples_per_round=3, closures_per_round=6)
    report["targets"] = check_targets(report["results"], report["shaped"])
    table = render_table(report)
    assert "(15 first fetches once every server has the path, 30 fresh closures)" in table
    # a run recorded before closures had their own count: as many closures as first fetches
    del report["shaped"]["closures_per_round"]
    assert "(15 first fetches once every server has the path, 15 fresh closures)" in render_table(report)
