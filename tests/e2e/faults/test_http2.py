"""HTTP/2 under abuse, against the real server over h2c and TLS (ALPN h2), with a raw h2 client.

Issue 14, rows 1–4: a slow reader must not make the worker buffer the NAR; rapid resets must
stop production and cost little; aborted clients must leave no descriptor or connection behind;
a path collected while it streams must end in a stream reset, not a hang. Each scenario is
bounded (≤ 30 s) and records its figures (memory from /proc/<pid>/status of the worker, which
with workers = 1 is the server process itself).
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h2.exceptions
import httpx
import pytest
import trio
import trio.lowlevel
import trustme
from h2.errors import ErrorCodes

from tests.support.cache_server import CacheServer, start_cache
from tests.support.fixtures import Fixtures
from tests.support.h2client import H2Client
from tests.support.nix import build, run

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
RSS_LIMIT = 150 * MiB


@dataclass
class Target:
    kind: str  # "h2c" | "tls"
    server: CacheServer
    ca_file: Path | None

    @property
    def pid(self) -> int:
        return self.server.proc.pid

    def ssl_context(self) -> ssl.SSLContext:
        assert self.ca_file is not None
        return ssl.create_default_context(cafile=str(self.ca_file))

    def http(self) -> httpx.Client:
        verify: ssl.SSLContext | bool = self.ssl_context() if self.ca_file else True
        return httpx.Client(
            base_url=self.server.url, timeout=30, verify=verify, headers={"Accept-Encoding": "identity"}
        )

    async def connect(self, **client_kw: object) -> H2Client:
        host, port = self.server.hostport.rsplit(":", 1)
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, int(port))
        if self.ca_file is not None:
            ctx = self.ssl_context()
            ctx.set_alpn_protocols(["h2"])
            tls = trio.SSLStream(stream, ctx, server_hostname="127.0.0.1")
            await tls.do_handshake()
            assert tls.selected_alpn_protocol() == "h2"
            stream = tls
        client = H2Client(stream, **client_kw)  # type: ignore[arg-type]
        await client.start()
        return client


@pytest.fixture(scope="module", params=["h2c", "tls"])
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, nix_daemon_env: dict[str, str]
) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp(f"h2-{request.param}")
    tls: dict[str, str] = {}
    ca_file = None
    if request.param == "tls":
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        cert.private_key_and_cert_chain_pem.write_to_path(str(tmp / "chain.pem"))
        cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
        ca_file = tmp / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        tls = {"tls_cert_path": str(tmp / "chain.pem"), "tls_key_path": str(tmp / "key.pem")}
    with start_cache(tmp, enable_compression=False, **tls) as server:
        yield Target(request.param, server, ca_file)


# --- the worker, seen from /proc ---------------------------------------------------------


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PeakRss:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss(pid)

    async def watch(self) -> None:
        while True:
            self.peak = max(self.peak, rss(self.pid))
            await trio.sleep(0.05)


def nar_url(target: Target, path: str) -> str:
    hash_part = Path(path).name[:32]
    with target.http() as client:
        text = client.get(f"/{hash_part}.narinfo").text
    narhash = next(line for line in text.splitlines() if line.startswith("NarHash: "))
    return f"/nar/{narhash.removeprefix('NarHash: sha256:')}.nar?hash={hash_part}"


def gauges(target: Target) -> dict[str, int]:
    with target.http() as client:
        text = client.get("/metrics").text
    out = {}
    for line in text.splitlines():
        if line.startswith(("harmonia_open_connections ", "harmonia_nars_in_flight ")):
            name, value = line.split()
            out[name] = int(value)
    return out


async def settled(target: Target, fds_before: int) -> tuple[int, dict[str, int]]:
    """Wait until the worker holds no more descriptors than before and counts only the metrics
    request's own connection; returns what it last saw."""
    deadline = trio.current_time() + 10
    while True:
        fds = open_fds(target.pid)
        seen = await trio.to_thread.run_sync(gauges, target)
        clean = (
            fds <= fds_before
            and seen["harmonia_open_connections"] == 1
            and seen["harmonia_nars_in_flight"] == 0
        )
        if clean or trio.current_time() > deadline:
            return fds, seen
        await trio.sleep(0.2)


# --- the scenarios -----------------------------------------------------------------------


async def test_slow_reader_keeps_the_worker_bounded(
    target: Target, store_fixtures: Fixtures, figures: dict[str, object]
) -> None:
    """Five streams on the big NAR, 64 KiB windows, read at ~3 MB/s in all for 8 s."""
    url = await trio.to_thread.run_sync(nar_url, target, store_fixtures.big)
    fds_before = open_fds(target.pid)
    peak = PeakRss(target.pid)
    rss_before = peak.peak
    streams = 5
    rate = 3 * MiB
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peak.watch)
            client = await target.connect(window=65535, auto_ack=False, keep_data=False)
            client.conn.increment_flow_control_window(streams * 65535)  # 64 KiB for each stream
            nursery.start_soon(client.read_forever)
            sids = [await client.request(url) for _ in range(streams)]
            acked = dict.fromkeys(sids, 0)
            started = trio.current_time()
            while trio.current_time() - started < 8:
                await trio.sleep(0.05)
                allowed = int(rate * (trio.current_time() - started) / streams)
                for sid in sids:
                    rec = client.streams[sid]
                    grant = min(rec.received, allowed) - acked[sid]
                    if grant > 0:
                        client.ack(sid, grant)
                        acked[sid] += grant
                await client.flush()
            received = sum(client.streams[sid].received for sid in sids)
            assert all(client.streams[sid].status == 200 for sid in sids)
            assert not any(client.streams[sid].done for sid in sids)
            await trio.aclose_forcefully(client.stream)
            nursery.cancel_scope.cancel()
    fds_after, seen = await settled(target, fds_before)
    figures.update(
        transport=target.kind,
        streams=streams,
        received_mib=round(received / MiB, 1),
        rss_before_mib=round(rss_before / MiB, 1),
        rss_peak_mib=round(peak.peak / MiB, 1),
        fds_before=fds_before,
        fds_after=fds_after,
    )
    assert received > 5 * MiB  # it did stream
    assert peak.peak < RSS_LIMIT, f"worker RSS reached {peak.peak / MiB:.0f} MiB"
    assert fds_after <= fds_before and seen["harmonia_open_connections"] == 1


async def test_rapid_reset_stops_production(
    target: Target, store_fixtures: Fixtures, figures: dict[str, object]
) -> None:
    """2 000 streams for the big NAR, each reset at once, over as many connections as the
    server allows (it closes a connection that resets too fast)."""
    url = await trio.to_thread.run_sync(nar_url, target, store_fixtures.big)
    fds_before = open_fds(target.pid)
    cpu_before = cpu_seconds(target.pid)
    peak = PeakRss(target.pid)
    total, connections, refused = 2000, 0, 0
    warned_before = target.server.log.count("resets streams too fast")
    resets = 0
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peak.watch)
            while resets < total:
                client = await target.connect()
                connections += 1
                async with trio.open_nursery() as reading:
                    reading.start_soon(client.read_forever)
                    while resets < total and not client.closed and client.terminated is None:
                        try:
                            sid = await client.request(url)
                            await client.reset(sid)
                        except h2.exceptions.ProtocolError:
                            break  # the server's GOAWAY arrived in between
                        resets += 1
                        if resets % 20 == 0:
                            await trio.lowlevel.checkpoint()  # let the reader see what the server said
                    with trio.move_on_after(2):  # what the server said before it closed
                        while client.terminated is None and not client.closed:  # noqa: ASYNC110
                            await trio.sleep(0.01)
                    reading.cancel_scope.cancel()
                if client.terminated == ErrorCodes.ENHANCE_YOUR_CALM:
                    refused += 1
                await trio.aclose_forcefully(client.stream)
            nursery.cancel_scope.cancel()
    fds_after, seen = await settled(target, fds_before)
    cpu = cpu_seconds(target.pid) - cpu_before
    # a TLS client whose send failed cannot read the GOAWAY any more: the server's log says it
    closed_by_server = target.server.log.count("resets streams too fast") - warned_before
    figures.update(
        transport=target.kind,
        resets=resets,
        connections=connections,
        goaway_seen=refused,
        closed_for_resetting=closed_by_server,
        cpu_s=round(cpu, 2),
        rss_peak_mib=round(peak.peak / MiB, 1),
        fds_before=fds_before,
        fds_after=fds_after,
    )
    assert peak.peak < RSS_LIMIT
    assert closed_by_server > 0 or refused > 0  # the server noticed and closed resetting connections
    assert fds_after <= fds_before and seen["harmonia_open_connections"] == 1
    assert seen["harmonia_nars_in_flight"] == 0
    # no body keeps being produced after its reset: far below one full NAR read per stream
    assert cpu < 20, f"{cpu:.1f} s of CPU for {resets} reset streams"


async def test_aborted_clients_leave_nothing_open(
    target: Target, store_fixtures: Fixtures, figures: dict[str, object]
) -> None:
    url = await trio.to_thread.run_sync(nar_url, target, store_fixtures.big)
    fds_before = open_fds(target.pid)
    with trio.fail_after(30):
        for _ in range(6):
            client = await target.connect(keep_data=False)
            sid = await client.request(url)
            while client.streams[sid].received < MiB:
                assert await client.pump()
            await trio.aclose_forcefully(client.stream)  # gone mid-NAR, no goodbye
    fds_after, seen = await settled(target, fds_before)
    figures.update(transport=target.kind, aborts=6, fds_before=fds_before, fds_after=fds_after, **seen)
    assert fds_after <= fds_before, "descriptors on the NAR stayed open"
    assert seen["harmonia_open_connections"] == 1 and seen["harmonia_nars_in_flight"] == 0


MANY_FILES = """
let mk = name: script: builtins.derivation {{
  inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ];
}};
in mk "hc-h2-gc-{tag}" ''
  /bin/mkdir -p $out
  for i in $(/usr/bin/seq 1 2000); do /usr/bin/head -c 20000 /dev/zero > $out/f$i; done
  /bin/echo {tag} > $out/tag
''
"""


async def test_path_collected_while_streaming_resets_the_stream(
    target: Target, nix_daemon_env: dict[str, str], figures: dict[str, object]
) -> None:
    tag = f"{target.kind}-{time.time_ns()}"
    path = (await trio.to_thread.run_sync(build, MANY_FILES.format(tag=tag), nix_daemon_env))[0]
    url = await trio.to_thread.run_sync(nar_url, target, path)
    with trio.fail_after(30):
        client = await target.connect(window=65535, auto_ack=False, keep_data=False)
        sid = await client.request(url)
        rec = client.streams[sid]
        while rec.received < 32 * 1024:
            assert await client.pump()
        # only our own path, built above: never anyone else's
        await trio.to_thread.run_sync(lambda: run(["nix-store", "--delete", path], env=nix_daemon_env))
        client.auto_ack = True
        client.ack(sid, rec.received)
        await client.flush()
        await client.wait(sid)
        await trio.aclose_forcefully(client.stream)
    figures.update(transport=target.kind, received_kib=rec.received // 1024, reset=rec.reset)
    assert not rec.ended, "a NAR of a collected path was ended as if whole"
    assert rec.reset == ErrorCodes.INTERNAL_ERROR
