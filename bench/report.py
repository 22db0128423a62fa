"""Ratios, targets, the table and the chart of a benchmark run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# (name, how to compute ours/reference or an absolute figure, comparison, target)
TARGETS = [
    ("narinfo requests/s vs Caddy", ">=", 0.35),
    ("NAR MiB/s, 1 connection, vs Caddy", ">=", 0.6),
    ("NAR MiB/s, 16 connections, vs Caddy", ">=", 0.6),
    ("zstd wire bytes / NAR size", "<=", 0.5),
    ("zstd transfer time / identity transfer", "<=", 1.5),
    ("peak RSS with 64 NARs in flight (MiB)", "<=", 150.0),
    ("request errors", "<=", 0),
    ("time grows linearly with NAR size (per-MB time, largest / middle size)", "<=", 1.5),
]


def _get(results: dict[str, Any], key: str, *path: str) -> float:
    node: Any = results[key]
    for part in path:
        node = node[part]
    return float(node)


def figures(results: dict[str, Any]) -> list[float]:
    c, h = "caddy", "harmonia"
    zstd = results[h]["zstd"]
    errors = sum(
        int(results[k][m]["errors"]) for k in (c, h) for m in ("narinfo", "nar_c1", "nar_c16", "rss_64")
    )
    by_size = results[h]["by_size"]
    sizes = sorted(by_size, key=int)
    per_mb = [by_size[s]["seconds"] / (by_size[s]["bytes"] / 2**20) for s in sizes]
    return [
        _get(results, h, "narinfo", "rps") / _get(results, c, "narinfo", "rps"),
        _get(results, h, "nar_c1", "mib_s") / _get(results, c, "nar_c1", "mib_s"),
        _get(results, h, "nar_c16", "mib_s") / _get(results, c, "nar_c16", "mib_s"),
        float(zstd["wire_ratio"]),
        min(float(zstd["copy_time_ratio"]), float(zstd["content_encoding_time_ratio"])),
        _get(results, h, "rss_64", "peak_mib"),
        float(errors),
        # the smallest transfers are dominated by fixed costs; superlinear growth shows between
        # the two largest
        per_mb[-1] / per_mb[-2] if per_mb[-2] > 0 else 0.0,
    ]


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for (name, op, target), value in zip(TARGETS, figures(results), strict=True):
        met = value >= target if op == ">=" else value <= target
        out.append({"name": name, "value": round(value, 3), "op": op, "target": target, "met": met})
    return out


def render_table(report: dict[str, Any]) -> str:
    r = report["results"]
    c, h = r["caddy"], r["harmonia"]
    rows = [
        ("narinfo requests/s (16 conns)", c["narinfo"]["rps"], h["narinfo"]["rps"]),
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
        f"Run {report['when']} on {report['machine']['cores']} cores, harmonia-cache with "
        f"{report['workers']} workers (store backend {report.get('backend', 'db')}), {report['seconds_per_phase']} s per load phase.",
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
        f"a live stream (level ≤ 3, {z['live_stream_bytes'] / 2**20:.1f} MiB for a 100 MB NAR) before the copy exists: "
        f"{z['live_stream_ratio_vs_identity']:.2f}× the identity time.",
        "",
        "| target | value | goal | met |",
        "|---|---:|---:|:---:|",
    ]
    for t in report["targets"]:
        lines.append(
            f"| {t['name']} | {t['value']} | {t['op']} {t['target']} | {'yes' if t['met'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def render_chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = report["results"]
    c, h = r["caddy"], r["harmonia"]
    panels = [
        ("narinfo requests/s\n(16 connections)", c["narinfo"]["rps"], h["narinfo"]["rps"]),
        ("NAR MiB/s\n(1 connection)", c["nar_c1"]["mib_s"], h["nar_c1"]["mib_s"]),
        ("NAR MiB/s\n(16 connections)", c["nar_c16"]["mib_s"], h["nar_c16"]["mib_s"]),
        ("NAR time to first byte\n(ms, lower is better)", c["ttfb_ms"], h["ttfb_ms"]),
        ("peak RSS, 64 NARs\n(MiB, lower is better)", c["rss_64"]["peak_mib"], h["rss_64"]["peak_mib"]),
    ]
    fig, grid = plt.subplots(2, 3, figsize=(13, 7.5))
    axes = list(grid.flat)
    for ax, (title, ref, ours) in zip(axes, panels, strict=False):
        bars = ax.bar(["Caddy file_server", "harmonia-cache"], [ref, ours], color=["#888888", "#2a7ab0"])
        ratio = f" — {ours / ref:.2f}×" if ref else ""
        ax.set_title(title.replace("\n", " ") + ratio, fontsize=10)
        ax.bar_label(bars, fmt="%.2f" if max(ref, ours) < 10 else "%.0f")
        ax.margins(y=0.15)
    ax = axes[-1]
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
    fig.suptitle(f"harmonia-cache vs Caddy file_server — {report['when']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
