"""Ratios, targets, the table and the chart of a benchmark run."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

SHAPED_CLIENTS = ("nix-2.8", "nix-2.26")
SHAPED_LABELS = {
    "at_once": "first fetch of a fresh {mb} MB path, at once after its build (ours only: live stream)",
    "first": "first fetch of a fresh {mb} MB path, once every server has it",
    "again": "the same path again",
    "closure": "a {n}-path closure",
    "closure_old": "a {n}-path closure built before the servers started (nothing learnt, no copies)",
}


SHORT_LABELS = {
    "at_once": "fresh {mb} MB,\nat once",
    "first": "fresh {mb} MB,\npublished",
    "again": "same again",
    "closure": "{n}-path closure",
    "closure_old": "{n}-path closure,\nbuilt before",
}


def _get(results: dict[str, Any], key: str, *path: str) -> float:
    node: Any = results[key]
    for part in path:
        node = node[part]
    return float(node)


def _loopback_figures(results: dict[str, Any]) -> list[tuple[str, str, float, float]]:
    """(name, comparison, target, value) of the loopback phases."""
    if not results:
        return []
    c, h, o = "caddy", "harmonia", "harmonia_other"
    zstd = results[h]["zstd"]
    errors = sum(
        int(results[k][m]["errors"]) for k in (c, h) for m in ("narinfo", "nar_c1", "nar_c16", "rss_64")
    ) + int(results[o]["narinfo"]["errors"])
    by_size = results[h]["by_size"]
    sizes = sorted(by_size, key=int)
    per_mb = [by_size[s]["seconds"] / (by_size[s]["bytes"] / 2**20) for s in sizes]
    narinfo = {
        results[h].get("backend", "db"): _get(results, h, "narinfo", "rps"),
        results[o]["backend"]: _get(results, o, "narinfo", "rps"),
    }
    caddy_rps = _get(results, c, "narinfo", "rps")
    return [
        ("narinfo requests/s vs Caddy, db backend", ">=", 0.8, narinfo["db"] / caddy_rps),
        ("narinfo requests/s vs Caddy, daemon backend", ">=", 0.7, narinfo["daemon"] / caddy_rps),
        (
            "NAR MiB/s, 1 connection, vs Caddy",
            ">=",
            1.0,
            _get(results, h, "nar_c1", "mib_s") / _get(results, c, "nar_c1", "mib_s"),
        ),
        (
            "NAR MiB/s, 16 connections, vs Caddy",
            ">=",
            1.0,
            _get(results, h, "nar_c16", "mib_s") / _get(results, c, "nar_c16", "mib_s"),
        ),
        ("zstd wire bytes / NAR size", "<=", 0.5, float(zstd["wire_ratio"])),
        (
            "zstd transfer time / identity transfer",
            "<=",
            1.5,
            min(float(zstd["copy_time_ratio"]), float(zstd["content_encoding_time_ratio"])),
        ),
        ("peak RSS with 64 NARs in flight (MiB)", "<=", 150.0, _get(results, h, "rss_64", "peak_mib")),
        ("request errors", "<=", 0, float(errors)),
        # the smallest transfers are dominated by fixed costs; superlinear growth shows between the two largest
        (
            "time grows linearly with NAR size (per-MB time, largest / middle size)",
            "<=",
            1.5,
            per_mb[-1] / per_mb[-2] if per_mb[-2] > 0 else 0.0,
        ),
    ]


def shaped_ratio(times: dict[str, dict[str, float]], server: str, measure: str) -> float:
    """Speed of `server` against Caddy over the zstd export (>= 1: at least as fast). A fetch at
    once after the build has no static counterpart: it is compared with Caddy's first fetch."""
    reference = "first" if measure == "at_once" else measure
    return times["caddy-zstd"][reference] / times[server][measure]


def paired_ratio(samples: dict[str, dict[str, list[float]]], server: str, measure: str) -> float:
    """The median of per-fetch ratios against Caddy's zstd export on the same paths (each round's
    fetches of one path line up across servers): shown beside `shaped_ratio`, never instead; it
    cancels what a round shares (the paths, the machine's state), so it resolves smaller effects."""
    reference = "first" if measure == "at_once" else measure
    ours, caddy = samples[server].get(measure, []), samples["caddy-zstd"].get(reference, [])
    ratios = [c / o for c, o in zip(caddy, ours, strict=False) if o > 0]
    return statistics.median(ratios) if ratios else float("nan")


def _shaped_figures(shaped: dict[str, Any]) -> list[tuple[str, str, float, float]]:
    if "skipped" in shaped and shaped["skipped"] == "--no-shaped":
        return []
    rows = []
    for client in SHAPED_CLIENTS:
        times = shaped.get("clients", {}).get(client)
        for backend in ("daemon", "db"):
            for measure, target in (("first", 0.9), ("closure", 1.0)):
                name = f"shaped link, {client}, {backend} backend: {measure} vs Caddy zstd export"
                value = shaped_ratio(times, f"ours-{backend}", measure) if times else float("nan")
                rows.append((name, ">=", target, value))
    return rows


def check_targets(results: dict[str, Any], shaped: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    out = []
    for name, op, target, value in [*_loopback_figures(results), *_shaped_figures(shaped or {})]:
        measured = value == value  # NaN: not measured (a client or the link was missing)
        met = measured and (value >= target if op == ">=" else value <= target)
        out.append(
            {
                "name": name,
                "value": round(value, 3) if measured else None,
                "op": op,
                "target": target,
                "met": met,
            }
        )
    return out


def _samples(shaped: dict[str, Any]) -> int:
    return int(shaped.get("rounds", 1)) * int(shaped.get("samples_per_round", 1))


def _closures(shaped: dict[str, Any]) -> int:
    per_round = shaped.get("closures_per_round", shaped.get("samples_per_round", 1))
    return int(shaped.get("rounds", 1)) * int(per_round)


def render_shaped(shaped: dict[str, Any]) -> list[str]:
    if "skipped" in shaped:
        return [f"Shaped-link phase skipped: {shaped['skipped']}."]
    lines = [
        f"Shaped link: {shaped['rate']} (tbf on both ends of a veth between two network namespaces; "
        "servers in one, the client in the other), `nix copy --no-check-sigs` into a fresh store with a "
        "fresh narinfo cache, wall seconds (lower is better), the median of "
        f"{shaped.get('rounds', 1)} round(s) on newly built paths ({_samples(shaped)} first fetches once every "
        f"server has the path, {_closures(shaped)} fresh closures); ratio = "
        "Caddy zstd export time / ours (>= 1: we are at least as fast), of the medians (the targets' "
        "figure) and, beside it, the median of the ratios fetch by fetch (paired).",
        "",
        "| what | client | ours, daemon backend | ours, db backend | Caddy, zstd export | Caddy, none export "
        "| ratio daemon | ratio db | paired daemon | paired db |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for client, times in shaped["clients"].items():
        for measure in ("at_once", "first", "again", "closure", "closure_old"):
            if measure not in times["ours-db"]:
                continue
            label = SHAPED_LABELS[measure].format(mb=shaped["big_mb"], n=shaped["closure_paths"])
            cells = [
                f"{times[s][measure]:.2f}" if measure in times[s] else "—"
                for s in ("ours-daemon", "ours-db", "caddy-zstd", "caddy-none")
            ]
            ratios = [f"{shaped_ratio(times, s, measure):.2f}×" for s in ("ours-daemon", "ours-db")]
            samples = shaped.get("samples", {}).get(client)
            ratios += [
                f"{paired_ratio(samples, s, measure):.2f}×" if samples else "—"
                for s in ("ours-daemon", "ours-db")
            ]
            lines.append(f"| {label} | {client} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    lagged = shaped.get("first_without_copy", {})
    if lagged:
        rounds = _samples(shaped)
        counts = "; ".join(
            f"{client}: daemon {by.get('ours-daemon', 0)}/{rounds}, db {by.get('ours-db', 0)}/{rounds}"
            for client, by in lagged.items()
        )
        lines.append(
            "\nOur first fetches once every server has the path that found no compressed copy yet "
            f"(a live stream instead): {counts}."
        )
    for note in shaped.get("missing_clients", []):
        lines.append(f"\nNot measured: {note}.")
    return lines


def render_table(report: dict[str, Any]) -> str:
    r = report["results"]
    header = (
        f"Run {report['when']} on {report['machine']['cores']} cores, harmonia-cache with "
        f"{report['workers']} workers."
    )
    if not r:
        return "\n".join([header, "", *render_shaped(report["shaped"]), "", *_targets_table(report)]) + "\n"
    c, h, o = r["caddy"], r["harmonia"], r["harmonia_other"]
    backend = report.get("backend", "db")
    rows = [
        (f"narinfo requests/s (16 conns), {backend} backend", c["narinfo"]["rps"], h["narinfo"]["rps"]),
        (f"narinfo requests/s (16 conns), {o['backend']} backend", c["narinfo"]["rps"], o["narinfo"]["rps"]),
        ("narinfo p50 latency (ms)", c["narinfo"]["p50_ms"], h["narinfo"]["p50_ms"]),
        ("narinfo p99 latency (ms)", c["narinfo"]["p99_ms"], h["narinfo"]["p99_ms"]),
        ("NAR MiB/s, 1 connection", c["nar_c1"]["mib_s"], h["nar_c1"]["mib_s"]),
        ("NAR MiB/s, 16 connections", c["nar_c16"]["mib_s"], h["nar_c16"]["mib_s"]),
        ("NAR time to first byte (ms)", c["ttfb_ms"], h["ttfb_ms"]),
        ("peak RSS, 64 NARs in flight (MiB)", c["rss_64"]["peak_mib"], h["rss_64"]["peak_mib"]),
        ("NAR MiB/s, 64 connections", c["rss_64"]["mib_s"], h["rss_64"]["mib_s"]),
    ]
    for size in sorted(c["by_size"], key=int):
        rows.append(
            (
                f"{size} MB NAR, ms (1 conn)",
                c["by_size"][size]["seconds"] * 1000,
                h["by_size"][size]["seconds"] * 1000,
            )
        )
    lines = [
        f"{header} Loopback: store backend {backend} unless a row says otherwise, "
        f"{report['seconds_per_phase']} s per load phase.",
        "",
        "| measure | Caddy file_server | harmonia-cache | ratio |",
        "|---|---:|---:|---:|",
    ]
    for name, ref, ours in rows:
        ratio = ours / ref if ref else float("nan")
        lines.append(f"| {name} | {ref:,.2f} | {ours:,.2f} | {ratio:.2f}× |")
    z = h["zstd"]
    lines += [
        "",
        f"zstd (harmonia-cache, {z['nar_size'] / 2**20:.0f} MiB NAR): compressed copy {z['wire_bytes'] / 2**20:.1f} MiB "
        f"({z['wire_ratio']:.3f}× of the NAR), transfer {z['copy_s']:.3f} s vs identity {z['identity_s']:.3f} s "
        f"({z['copy_time_ratio']:.2f}×); as Content-Encoding {z['content_encoding_time_ratio']:.2f}×; "
        f"a live stream (the copy's level, {z['live_stream_bytes'] / 2**20:.1f} MiB for a 100 MB NAR) before the copy exists: "
        f"{z['live_stream_ratio_vs_identity']:.2f}× the identity time.",
        "",
        *render_shaped(report["shaped"]),
        "",
        *_targets_table(report),
    ]
    return "\n".join(lines) + "\n"


def _targets_table(report: dict[str, Any]) -> list[str]:
    lines = ["| target | value | goal | met |", "|---|---:|---:|:---:|"]
    for t in report["targets"]:
        value = "not measured" if t["value"] is None else t["value"]
        lines.append(f"| {t['name']} | {value} | {t['op']} {t['target']} | {'yes' if t['met'] else 'NO'} |")
    return lines


def render_chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = report["results"]
    shaped = report.get("shaped", {})
    has_shaped = "clients" in shaped and bool(shaped["clients"])
    fig = plt.figure(figsize=(13, 11 if has_shaped else 7.5))
    rows = (3 if has_shaped else 2) if r else 1
    if r:
        _loopback_panels(fig, rows, r, report.get("backend", "db"))
    if has_shaped:
        _shaped_panel(fig.add_subplot(rows, 1, rows), shaped)
    fig.suptitle(f"harmonia-cache vs Caddy file_server — {report['when']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _loopback_panels(fig: Any, rows: int, r: dict[str, Any], backend: str) -> None:
    c, h, o = r["caddy"], r["harmonia"], r["harmonia_other"]
    panels = [
        (f"narinfo requests/s ({backend})", c["narinfo"]["rps"], h["narinfo"]["rps"]),
        (f"narinfo requests/s ({o['backend']})", c["narinfo"]["rps"], o["narinfo"]["rps"]),
        ("NAR MiB/s\n(1 connection)", c["nar_c1"]["mib_s"], h["nar_c1"]["mib_s"]),
        ("NAR MiB/s\n(16 connections)", c["nar_c16"]["mib_s"], h["nar_c16"]["mib_s"]),
        ("peak RSS, 64 NARs\n(MiB, lower is better)", c["rss_64"]["peak_mib"], h["rss_64"]["peak_mib"]),
    ]
    for i, (title, ref, ours) in enumerate(panels):
        ax = fig.add_subplot(rows, 3, i + 1)
        bars = ax.bar(["Caddy file_server", "harmonia-cache"], [ref, ours], color=["#888888", "#2a7ab0"])
        ratio = f" — {ours / ref:.2f}×" if ref else ""
        ax.set_title(title.replace("\n", " ") + ratio, fontsize=10)
        ax.bar_label(bars, fmt="%.2f" if max(ref, ours) < 10 else "%.0f")
        ax.margins(y=0.15)
    ax = fig.add_subplot(rows, 3, 6)
    for name, series, color in (
        ("Caddy file_server", c["by_size"], "#888888"),
        ("harmonia-cache", h["by_size"], "#2a7ab0"),
    ):
        sizes = sorted(series, key=int)
        ax.plot(
            [int(s) for s in sizes],
            [series[s]["seconds"] * 1000 for s in sizes],
            "o-",
            label=name,
            color=color,
        )
    ax.set_title("transfer time vs NAR size (1 connection)", fontsize=10)
    ax.set_xlabel("NAR size (MB)")
    ax.set_ylabel("ms")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend()


def _shaped_panel(ax: Any, shaped: dict[str, Any]) -> None:
    servers = [
        ("ours-daemon", "harmonia-cache (daemon)", "#2a7ab0"),
        ("ours-db", "harmonia-cache (db)", "#6fb3e0"),
        ("caddy-zstd", "Caddy, zstd export", "#555555"),
        ("caddy-none", "Caddy, none export", "#bbbbbb"),
    ]
    groups = [
        (client, m)
        for client in shaped["clients"]
        for m in ("at_once", "first", "again", "closure", "closure_old")
        if m in shaped["clients"][client]["ours-db"]
    ]
    width = 0.8 / len(servers)
    for k, (key, label, color) in enumerate(servers):
        xs = [i + (k - 1.5) * width for i in range(len(groups))]
        ys = [shaped["clients"][client][key].get(m) for client, m in groups]
        bars = ax.bar(xs, [y or 0.0 for y in ys], width, label=label, color=color)
        # no bar label where the server has no such fetch (a static cache cannot serve at once)
        ax.bar_label(bars, labels=["" if y is None else f"{y:.1f}" for y in ys], fontsize=7)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(
        [
            f"{client}\n{SHORT_LABELS[m].format(mb=shaped['big_mb'], n=shaped['closure_paths'])}"
            for client, m in groups
        ],
        fontsize=8,
    )
    ax.set_ylabel("seconds (lower is better)")
    ax.set_title(f"shaped link ({shaped['rate']}): nix copy into a fresh store", fontsize=10)
    ax.legend(fontsize=8)
