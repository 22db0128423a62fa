"""`python -m bench`: harmonia-cache side by side with Caddy's file_server on a static export.

Every figure is measured in the same run on the same machine, and reported as a ratio against
the reference; absolute numbers drift between machines and minutes, ratios much less.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from .fixtures import SIZES_MB, build_closure, export
from .measure import PeakRss, best_of, cpu_count, curl, wrk
from .report import check_targets, render_chart, render_table
from .servers import Server, caddy_file_server, harmonia_cache

PHASES = 9


def progress(step: int, text: str) -> None:
    filled = int(30 * step / PHASES)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {step}/{PHASES} {text:<60}\n")
    sys.stderr.flush()


def narinfo_fields(text: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


def fetch_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as resp:
        return str(resp.read().decode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("/var/tmp/harmonia-bench"),
        help="build state, export and server state (reused between runs)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each load phase")
    parser.add_argument("--small", type=int, default=300, help="number of small paths")
    parser.add_argument("--workers", type=int, default=cpu_count())
    args = parser.parse_args(argv)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    secs = args.seconds

    progress(0, "building the closure in the store")
    closure = build_closure(work, args.small, SIZES_MB)
    progress(1, "exporting it with nix copy --to file://…?compression=none")
    export_dir = work / "export"
    export(closure, export_dir, work)

    hashes = [Path(p).name[:32] for p in closure.small]
    narinfo_paths = [f"/{h}.narinfo" for h in hashes]
    big_hash = Path(closure.big).name[:32]
    results: dict[str, dict[str, object]] = {"caddy": {}, "harmonia": {}}

    with (
        caddy_file_server(export_dir, work) as caddy,
        harmonia_cache(work / "harmonia", args.workers) as ours,
    ):
        servers: dict[str, Server] = {"caddy": caddy, "harmonia": ours}

        def nar_url(key: str, store_path: str, compressed: bool = False) -> str:
            h = Path(store_path).name[:32]
            fields = narinfo_fields(fetch_text(f"{servers[key].url}/{h}.narinfo"))
            if key == "caddy":
                return "/" + fields["URL"]
            narhash = fields["NarHash"].removeprefix("sha256:")
            return f"/nar/{narhash}.nar{'.zst' if compressed else ''}?hash={h}"

        big_size = int(narinfo_fields(fetch_text(f"{caddy.url}/{big_hash}.narinfo"))["NarSize"])
        # warm the page cache and the servers, so every phase measures warm transfers
        for key in servers:
            curl(servers[key].url + nar_url(key, closure.big))

        progress(2, "narinfo requests, 16 connections")
        for key, srv in servers.items():
            r = wrk(srv.url, narinfo_paths, work, connections=16, seconds=secs)
            results[key]["narinfo"] = {
                "rps": r.rps,
                "p50_ms": r.p50_ms,
                "p99_ms": r.p99_ms,
                "errors": r.errors,
            }

        for step, conns in ((3, 1), (4, 16)):
            progress(step, f"NAR throughput, {conns} connection(s)")
            for key, srv in servers.items():
                r = wrk(
                    srv.url,
                    [nar_url(key, closure.big)],
                    work,
                    connections=conns,
                    seconds=secs,
                    threads=min(conns, 2),
                )
                results[key][f"nar_c{conns}"] = {"mib_s": r.mib_per_s, "errors": r.errors}

        progress(5, "time to first byte of a NAR")
        for key, srv in servers.items():
            url = srv.url + nar_url(key, closure.small[0])
            ttfbs = sorted(curl(url).ttfb for _ in range(21))
            results[key]["ttfb_ms"] = ttfbs[10] * 1000

        progress(6, "zstd: compressed copy and live stream")
        mid_path = closure.sized[sorted(closure.sized)[len(closure.sized) // 2]]
        live = curl(ours.url + nar_url("harmonia", mid_path), {"Accept-Encoding": "zstd"})
        mid_identity = best_of(3, ours.url + nar_url("harmonia", mid_path))
        deadline = time.monotonic() + 300
        while "Compression: zstd" not in fetch_text(f"{ours.url}/{big_hash}.narinfo"):
            if time.monotonic() > deadline:
                raise RuntimeError("no compressed copy of the big path after 300 s")
            time.sleep(0.5)
        identity = best_of(3, ours.url + nar_url("harmonia", closure.big))
        copy = best_of(3, ours.url + nar_url("harmonia", closure.big, compressed=True))
        encoded = best_of(3, ours.url + nar_url("harmonia", closure.big), {"Accept-Encoding": "zstd"})
        results["harmonia"]["zstd"] = {
            "nar_size": big_size,
            "wire_bytes": copy.size,
            "wire_ratio": copy.size / big_size,
            "identity_s": identity.seconds,
            "copy_s": copy.seconds,
            "copy_time_ratio": copy.seconds / identity.seconds,
            "content_encoding_s": encoded.seconds,
            "content_encoding_time_ratio": encoded.seconds / identity.seconds,
            "live_stream_bytes": live.size,
            "live_stream_ratio_vs_identity": live.seconds / mid_identity.seconds,
        }

        progress(7, "peak memory with 64 NARs in flight")
        for key, srv in servers.items():
            with PeakRss(srv.proc.pid) as peak:
                r = wrk(srv.url, [nar_url(key, closure.big)], work, connections=64, seconds=secs, threads=2)
            results[key]["rss_64"] = {"peak_mib": peak.peak / 2**20, "errors": r.errors, "mib_s": r.mib_per_s}

        progress(8, "time against NAR size")
        for key, srv in servers.items():
            series = {}
            for mb, path in sorted(closure.sized.items()):
                t = best_of(7, srv.url + nar_url(key, path))
                series[str(mb)] = {"seconds": t.seconds, "bytes": t.size}
            results[key]["by_size"] = series

    progress(9, "done")
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"cores": cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
        "workers": args.workers,
        "seconds_per_phase": secs,
        "results": results,
        "targets": check_targets(results),
    }
    (args.out / "latest.json").write_text(json.dumps(report, indent=2))
    table = render_table(report)
    (args.out / "latest.md").write_text(table)
    print(table)
    try:
        render_chart(report, args.out / "latest.png")
        print(f"chart: {args.out / 'latest.png'}")
    except ImportError:
        print("chart skipped: matplotlib is not installed (pip install -e '.[bench]')")
    failed = [t for t in report["targets"] if not t["met"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
