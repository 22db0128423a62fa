"""The shaped-link phase: servers in one network namespace, Nix clients in another, joined by a
veth limited with `tbf` on both ends (this kernel has no netem: no added delay, only the rate).

What it times is what a fleet host waits for: `nix copy` of a path that was built a moment ago
(nobody has fetched it yet), the same path again, and a closure of small paths, each into a
fresh client store with a fresh narinfo cache, with Debian's Nix 2.8 and trixie's Nix 2.26.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SERVER_IP = "10.231.77.1"
CLIENT_IP = "10.231.77.2"
BASE_NIX_CONFIG = "experimental-features = nix-command\nsubstituters =\nconnect-timeout = 10\n"
TRIXIE_ROOT = Path(os.environ.get("TRIXIE_ROOT") or "/var/cache/harmonia-bundle/trixie-nix")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@dataclass(frozen=True)
class Link:
    server_ns: str
    client_ns: str
    rate: str


@contextmanager
def shaped_link(rate: str) -> Iterator[Link]:
    """Two namespaces joined by a veth, `tbf rate <rate> burst 128kb latency 100ms` on each end;
    deleted afterwards (the veth goes with its namespaces)."""
    tag = uuid.uuid4().hex[:6]
    srv, cli = f"hb-srv-{tag}", f"hb-cli-{tag}"
    a, b = f"hbs{tag}", f"hbc{tag}"
    _ip("netns", "add", srv)
    try:
        _ip("netns", "add", cli)
        try:
            _ip("link", "add", a, "type", "veth", "peer", "name", b)
            _ip("link", "set", a, "netns", srv)
            _ip("link", "set", b, "netns", cli)
            for ns, dev, addr in ((srv, a, SERVER_IP), (cli, b, CLIENT_IP)):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                subprocess.run(
                    [
                        "tc",
                        "-n",
                        ns,
                        "qdisc",
                        "add",
                        "dev",
                        dev,
                        "root",
                        "tbf",
                        "rate",
                        rate,
                        "burst",
                        "128kb",
                        "latency",
                        "100ms",
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
            yield Link(srv, cli, rate)
        finally:
            subprocess.run(["ip", "netns", "del", cli], capture_output=True, check=False, timeout=30)
    finally:
        subprocess.run(["ip", "netns", "del", srv], capture_output=True, check=False, timeout=30)


def link_available() -> str | None:
    """Why the phase cannot run here, or None."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


@dataclass(frozen=True)
class Client:
    """One real Nix client: Debian's on this machine, or trixie's in its chroot (`root`)."""

    name: str
    root: Path | None  # None: this machine's client

    def inside(self, host_path: Path) -> str:
        if self.root is None:
            return str(host_path)
        return "/" + str(host_path.relative_to(self.root))

    @property
    def tmp(self) -> Path:
        """The client's /tmp, as this machine sees it."""
        return (self.root / "tmp") if self.root is not None else Path("/tmp")

    def scratch(self, tag: str, base: Path | None = None) -> Path:
        """A fresh directory the client can write (under its /tmp unless `base`, itself under it)."""
        path = (base or self.tmp) / f"harmonia-bench-{tag}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def copy(self, url: str, paths: list[str], scratch: Path, netns: str, timeout: float = 900) -> float:
        """`nix copy --from url` into a fresh store with a fresh narinfo cache: wall seconds."""
        store = scratch / "store"
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": "/root",
            "TMPDIR": "/tmp",
            "XDG_CACHE_HOME": self.inside(scratch / "xdg"),
            "NIX_CONFIG": BASE_NIX_CONFIG,
        }
        args = ["nix", "copy", "--no-check-sigs", "--from", url, "--to", self.inside(store), *paths]
        if self.root is not None:
            args = ["chroot", str(self.root), *args]
        start = time.monotonic()
        proc = subprocess.run(
            ["ip", "netns", "exec", netns, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        seconds = time.monotonic() - start
        if proc.returncode != 0:
            raise RuntimeError(f"[{self.name}] {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
        return seconds


def prefault(directory: Path, size: int) -> None:
    """Write `size` bytes to a file under `directory` (a tmpfs) and remove it, before a fetch.

    This machine is a KVM guest: memory freed for a few seconds goes back to the host, and the
    next process to use it pays a host page fault for every page. Measured with the same paths:
    the first 100 MB fetch after the exports (or after a 10 s pause) took 0.43-0.55 s from
    whichever server went first (Caddy's too) and 0.29-0.30 s for the next; with this before
    each fetch, 0.29-0.34 s for every one. A fleet host's memory is its own."""
    path = directory / f"prefault-{uuid.uuid4().hex[:8]}"
    block = b"\0" * (1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for _ in range(0, size, len(block)):
            os.write(fd, block)
    finally:
        os.close(fd)
        path.unlink()


@contextmanager
def client_disk(client: Client) -> Iterator[Path]:
    """A tmpfs under the client's /tmp for its fresh stores, unmounted afterwards.

    Client and servers share one disk here, and a fleet host's disk is not the cache's: on the
    shared disk a client's store writes (and Nix's SQLite syncs) waited for the writeback of the
    build and the exports, whichever server they came from. Measured in one hour: the first fetch
    after a pause 0.15-0.2 s slower for every server (curl over the same link: no difference),
    Caddy's own closure time 0.46-1.24 s over five rounds; on tmpfs 0.30-0.35 s."""
    mount = client.tmp / f"harmonia-bench-disk-{uuid.uuid4().hex[:8]}"
    mount.mkdir(parents=True)
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4g,mode=0755", "tmpfs", str(mount)],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        try:
            yield mount
        finally:
            subprocess.run(["umount", str(mount)], check=False, capture_output=True, timeout=60)
    finally:
        with contextlib.suppress(OSError):
            mount.rmdir()


def remove_tree(path: Path) -> None:
    """rm -rf for a client store (its directories are read-only)."""
    for directory, _subdirs, _files in os.walk(path):
        mode = os.lstat(directory).st_mode
        if not mode & 0o200:
            os.chmod(directory, mode | 0o200)
    shutil.rmtree(path, ignore_errors=True)


def clients() -> tuple[list[Client], list[str]]:
    """The clients present, and a note for each one missing (`./bootstrap bench` builds the chroot)."""
    found, missing = [Client("nix-2.8", None)], []
    if shutil.which("nix") is None:
        found, missing = [], ["nix-2.8: Debian's nix-bin is not installed"]
    if (TRIXIE_ROOT / "usr/bin/nix").exists() and (TRIXIE_ROOT / "proc/self").exists():
        found.append(Client("nix-2.26", TRIXIE_ROOT))
    else:
        missing.append(f"nix-2.26: no trixie chroot with its mounts at {TRIXIE_ROOT} (./bootstrap trixie)")
    return found, missing


OURS = ("ours-daemon", "ours-db")
CADDY = ("caddy-zstd", "caddy-none")
SERVERS = (*OURS, *CADDY)
MEASURES = ("at_once", "first", "again", "closure", "closure_old")
SETTLE = 2.0


def run_shaped(
    work: Path,
    rate: str,
    big_mb: int,
    small_count: int,
    workers: int,
    say: Callable[[str], None],
    rounds: int = 3,
    extra: int = 2,
    closures: int = 0,
) -> dict[str, Any]:
    """The whole phase; a dict for the report (`skipped` says why when it cannot run here).

    Each client runs `rounds` rounds, each on newly built paths (so every first fetch is really
    first); the report's time is the median of the rounds, and `samples` keeps every one: a single
    transfer over the shaped link varies by up to ±50 % from one try to the next, a closure's by
    ±15 %, more than the differences they measure. So each round also makes `extra` more first
    fetches of a published path and closures, each on paths built anew (about 15 s each); the
    samples of one path line up across servers (the report pairs them). A closure is the cheapest
    sample (a few seconds to build, no 100 MB path), and the one whose target sits at parity: each
    round adds `closures` more fresh closures alone."""
    from cache.hashes import nix32_encode

    from .fixtures import build_fresh, build_fresh_closure, build_fresh_published, export_to, nar_hash
    from .servers import caddy_file_server, harmonia_cache

    why = link_available()
    if why is not None:
        return {"skipped": why}
    found, missing = clients()
    result: dict[str, Any] = {
        "rate": rate,
        "big_mb": big_mb,
        "closure_paths": small_count + 1,
        "rounds": rounds,
        "samples_per_round": 1 + extra,
        "closures_per_round": 1 + extra + closures,
        "missing_clients": missing,
        "clients": {},
        "samples": {},
        # per client and server of ours: first fetches of the published path that found no
        # compressed copy yet (the copy lagged: those were live streams)
        "first_without_copy": {},
    }
    exports = {"zstd": work / "shaped-export-zstd", "none": work / "shaped-export-none"}
    # our servers' state directories (each starts empty: no compressed copies)
    states = {server: work / f"shaped-{server.removeprefix('ours-')}" for server in OURS}
    for directory in (*exports.values(), *states.values()):
        shutil.rmtree(directory, ignore_errors=True)
    for directory in exports.values():
        directory.mkdir(parents=True)
    # closures registered before our servers start: nothing learnt at registration, no copies (a
    # fleet host also fetches paths built earlier); one a round and client
    say(f"building {rounds * len(found)} closures before the servers start")
    older = {
        client.name: [
            build_fresh_closure(
                work, f"older-{client.name.replace('.', '')}-{r}-{time.time_ns()}", small_count
            )
            for r in range(rounds)
        ]
        for client in found
    }
    if any(older.values()):
        every = [top for tops in older.values() for top in tops]
        export_to(every, exports["zstd"], "zstd", work)
        export_to(every, exports["none"], "none", work)
    with shaped_link(rate) as link, ExitStack() as stack:
        servers = {
            "ours-daemon": stack.enter_context(
                harmonia_cache(states["ours-daemon"], workers, "daemon", SERVER_IP, link.server_ns)
            ),
            "ours-db": stack.enter_context(
                harmonia_cache(states["ours-db"], workers, "db", SERVER_IP, link.server_ns)
            ),
            "caddy-zstd": stack.enter_context(
                caddy_file_server(
                    exports["zstd"], work / "caddy-zstd", SERVER_IP, link.server_ns, "caddy zstd"
                )
            ),
            "caddy-none": stack.enter_context(
                caddy_file_server(
                    exports["none"], work / "caddy-none", SERVER_IP, link.server_ns, "caddy none"
                )
            ),
        }
        for n, client in enumerate(found):
            samples: dict[str, dict[str, list[float]]] = {s: {m: [] for m in MEASURES} for s in SERVERS}
            lagged = dict.fromkeys(OURS, 0)

            disk = stack.enter_context(client_disk(client))

            def fetch(server: str, paths: list[str], client: Client = client, disk: Path = disk) -> float:
                prefault(disk, (big_mb + 28) << 20)
                scratch = client.scratch(server, disk)
                try:
                    return client.copy(servers[server].url, paths, scratch, link.client_ns)
                finally:
                    remove_tree(scratch)

            def export(paths: list[str]) -> None:
                """Pushes the paths to the static caches (not timed)."""
                export_to(paths, exports["zstd"], "zstd", work)
                export_to(paths, exports["none"], "none", work)
                # the build's and the exports' writes flushed now, not by the writeback timer 30 s
                # later, in the middle of one server's fetch (a client then lagged up to 0.17 s
                # behind its download); and their threads out of the way of whoever goes first
                os.sync()
                time.sleep(SETTLE)

            def publish(published: str, top: str, lagged: dict[str, int] = lagged) -> None:
                """Exports the paths, and counts our servers that have no copy of the published
                path yet (their first fetch is then a live stream)."""
                export([published, top])
                copy_name = f"{nix32_encode(nar_hash(published, work))}.nar.zst"
                for server in OURS:
                    if not (states[server] / "nar-zstd" / copy_name).exists():
                        lagged[server] += 1

            for round_ in range(rounds):
                # the order alternates between clients and rounds, so that no server always goes first
                flip = (n + round_) % 2 == 1
                tag = f"{client.name.replace('.', '')}-{time.time_ns()}"
                say(
                    f"{client.name}, round {round_ + 1}/{rounds}: building a fresh {big_mb} MB path "
                    f"and a {small_count + 1}-path closure"
                )
                fresh = build_fresh(work, tag, big_mb, small_count)
                say(f"{client.name}, round {round_ + 1}/{rounds}: first fetches, again, the closure")
                # at once: our caches right after the build, before the copy can exist (a live
                # stream); a static cache cannot serve the path yet at all
                for server in tuple(reversed(OURS)) if flip else OURS:
                    samples[server]["at_once"].append(fetch(server, [fresh.big]))
                # published: a static cache has the paths once they were pushed to it; then every
                # server's first fetch of another fresh path
                publish(fresh.published, fresh.top)
                # every server goes first in turn (whoever goes first after a pause pays for it)
                turn = (n * rounds + round_) % len(SERVERS)
                order = (*SERVERS[turn:], *SERVERS[:turn])
                for measure, paths in (
                    ("first", [fresh.published]),
                    ("again", [fresh.published]),
                    ("closure", [fresh.top]),
                ):
                    for server in order:
                        samples[server][measure].append(fetch(server, paths))
                for server in order:
                    samples[server]["closure_old"].append(fetch(server, [older[client.name][round_]]))
                for more in range(extra):
                    say(
                        f"{client.name}, round {round_ + 1}/{rounds}: more first fetches and closures ({more + 1}/{extra})"
                    )
                    published, top = build_fresh_published(work, f"{tag}-{more}", big_mb, small_count)
                    publish(published, top)
                    turn = (turn + 1) % len(SERVERS)
                    order = (*SERVERS[turn:], *SERVERS[:turn])
                    for measure, paths in (("first", [published]), ("closure", [top])):
                        for server in order:
                            samples[server][measure].append(fetch(server, paths))
                for more in range(closures):
                    say(f"{client.name}, round {round_ + 1}/{rounds}: more closures ({more + 1}/{closures})")
                    top = build_fresh_closure(work, f"{tag}-closure-{more}", small_count)
                    export([top])
                    turn = (turn + 1) % len(SERVERS)
                    order = (*SERVERS[turn:], *SERVERS[:turn])
                    for server in order:
                        samples[server]["closure"].append(fetch(server, [top]))
            result["samples"][client.name] = samples
            result["first_without_copy"][client.name] = lagged
            result["clients"][client.name] = {
                server: {m: statistics.median(v) for m, v in by_measure.items() if v}
                for server, by_measure in samples.items()
            }
    return result
