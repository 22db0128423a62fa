"""`python -m bench`: harmonia-cache side by side with Caddy's file_server on a static export.

Every figure is measured in the same run on the same machine, and reported as a ratio against
the reference; absolute numbers drift between machines and minutes, ratios much less.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

from cache.launch import nix_daemon

from .fixtures import SIZES_MB, build_closure, export, nix_env, remove_fresh
from .measure import PeakRss, best_of, cpu_count, curl, wrk
from .report import check_targets, render_chart, render_table
from .servers import Server, caddy_file_server, harmonia_cache
from .shaped import run_shaped

PHASES = 10


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


def publish(table: str, chart: Path, doc: Path = Path("docs/benchmarks.md")) -> None:
    """Replace the results block of docs/benchmarks.md with this run's table, and its chart."""
    import shutil

    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    text = doc.read_text()
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    doc.write_text(f"{head}{start}\n{table}\n![side by side](benchmarks.png)\n{end}{tail}")
    if chart.exists():
        shutil.copy(chart, doc.with_suffix(".png"))


def loopback(args: argparse.Namespace, work: Path) -> dict[str, dict[str, object]]:
    """Every loopback phase: warm transfers, request rates, memory, against Caddy in the same minutes."""
    secs = args.seconds
    progress(0, "building the closure in the store")
    closure = build_closure(work, args.small, SIZES_MB)
    progress(1, "exporting it with nix copy --to file://…?compression=none")
    export_dir = work / "export"
    export(closure, export_dir, work)

    hashes = [Path(p).name[:32] for p in closure.small]
    narinfo_paths = [f"/{h}.narinfo" for h in hashes]
    big_hash = Path(closure.big).name[:32]
    results: dict[str, dict[str, object]] = {"caddy": {}, "harmonia": {}, "harmonia_other": {}}
    other_backend = "daemon" if args.backend == "db" else "db"

    # a fresh state directory: no compressed copies from an earlier run
    shutil.rmtree(work / "harmonia" / "nar-zstd", ignore_errors=True)
    shutil.rmtree(work / "harmonia-other" / "nar-zstd", ignore_errors=True)
    with (
        caddy_file_server(export_dir, work) as caddy,
        harmonia_cache(work / "harmonia", args.workers, args.backend) as ours,
        harmonia_cache(work / "harmonia-other", args.workers, other_backend) as other,
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
        # a live zstd stream: asked before anything (a narinfo) made a compressed copy of the path
        mid_path = closure.sized[sorted(closure.sized)[len(closure.sized) // 2]]
        mid_hash = Path(mid_path).name[:32]
        mid_narhash = narinfo_fields(fetch_text(f"{caddy.url}/{mid_hash}.narinfo"))["NarHash"][7:]
        live_url = f"{ours.url}/nar/{mid_narhash}.nar?hash={mid_hash}"
        curl(live_url)  # the file into the page cache
        live = curl(live_url, {"Accept-Encoding": "zstd"})
        # warm the page cache and the servers, so every phase measures warm transfers
        for key in servers:
            curl(servers[key].url + nar_url(key, closure.big))
        # let the background compressions the first narinfo requests started finish, so that they do
        # not run during the measurements (steady state: a fleet asks for a path many times)
        for small in [*closure.small, closure.big, mid_path]:
            fetch_text(f"{ours.url}/{Path(small).name[:32]}.narinfo")
        # (a copy shows as FileHash in the narinfo; a small NAR gets none, only the zstd offer)
        deadline = time.monotonic() + 300
        while any(
            mark not in fetch_text(f"{ours.url}/{Path(p).name[:32]}.narinfo")
            for p, mark in (
                (closure.big, "FileHash: "),
                (mid_path, "FileHash: "),
                (closure.small[-1], "Compression: zstd"),
            )
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("no compressed copies after 300 s")
            time.sleep(0.5)
        mid_identity = best_of(3, live_url)

        progress(2, "narinfo requests, 16 connections")
        for small in closure.small:  # the other backend's first answers too
            fetch_text(f"{other.url}/{Path(small).name[:32]}.narinfo")
        for key, srv in (*servers.items(), ("harmonia_other", other)):
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
                t = best_of(9, srv.url + nar_url(key, path))
                series[str(mb)] = {"seconds": t.seconds, "bytes": t.size}
            results[key]["by_size"] = series

    results["harmonia_other"]["backend"] = other_backend
    return results


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
    parser.add_argument(
        "--backend", choices=("db", "daemon"), default="db", help="harmonia-cache's store_backend"
    )
    parser.add_argument("--rate", default="100mbit", help="the shaped link's rate (tc tbf syntax)")
    parser.add_argument(
        "--fresh-mb", type=int, default=100, help="size of the freshly built path of the shaped-link phase"
    )
    parser.add_argument(
        "--closure", type=int, default=300, help="small paths in the shaped-link closure (plus its top)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="shaped-link rounds per client, each on newly built paths (the report takes the median)",
    )
    parser.add_argument(
        "--extra",
        type=int,
        default=None,
        help="more first fetches and closures per shaped-link round, each on paths built anew "
        "(about 15 s each; 2, or 0 with --quick)",
    )
    parser.add_argument(
        "--closures",
        type=int,
        default=None,
        help="more fresh closures alone per shaped-link round (a few seconds each; 3, or 0 with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="for development: 1 s load phases, a 20 MB fresh path and a 31-path closure",
    )
    parser.add_argument("--no-shaped", action="store_true", help="skip the shaped-link phase")
    parser.add_argument("--no-loopback", action="store_true", help="only the shaped-link phase")
    parser.add_argument(
        "--publish",
        action="store_true",
        help="also write the table and chart into docs/benchmarks.md and docs/benchmarks.png",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.fresh_mb, args.closure = 1.0, 20, 30
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    secs = args.seconds

    results: dict[str, dict[str, object]] = {}
    shaped: dict[str, object] = {"skipped": "--no-shaped"}
    # the daemon backend asks the nix-daemon: the machine's, or one of the bench's own
    with nix_daemon(work / "nix-daemon", nix_env(work)):
        try:
            if not args.no_loopback:
                results = loopback(args, work)
            if not args.no_shaped:
                progress(9, f"shaped link ({args.rate}): fresh path, again, closure")
                shaped = run_shaped(
                    work,
                    args.rate,
                    args.fresh_mb,
                    args.closure,
                    args.workers,
                    lambda text: progress(9, text),
                    rounds=1 if args.quick else args.rounds,
                    extra=args.extra if args.extra is not None else 0 if args.quick else 2,
                    closures=args.closures if args.closures is not None else 0 if args.quick else 3,
                )
        finally:
            # also when a phase failed: a run leaves no gigabytes of paths behind
            progress(10, "removing the paths it built anew from the store")
            kept = remove_fresh(work)
            if kept:
                print(f"\nnot removed from the store (still in use?): {' '.join(kept)}", file=sys.stderr)
    progress(10, "done")
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"cores": cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
        "workers": args.workers,
        "backend": args.backend,
        "seconds_per_phase": secs,
        "results": results,
        "shaped": shaped,
        "targets": check_targets(results, shaped),
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
    if args.publish:
        publish(table, args.out / "latest.png")
    failed = [t for t in report["targets"] if not t["met"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
