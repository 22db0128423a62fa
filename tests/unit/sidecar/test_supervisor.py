"""Supervision with the real Caddy on local sockets: restart after a crash, live
reconfiguration, health/status/metrics, and the one-sidecar-per-state-directory lock."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import trio

from common.problems import ConfigError, Problem
from sidecar import cli, supervisor
from sidecar.control_http import request_tcp, request_unix
from sidecar.engine import CaddyEngine
from sidecar.metrics import parse
from sidecar.model import ServiceSpec, SidecarSpec, ValidConfig, validate
from sidecar.supervisor import Sidecar, lock_process_dir

from .upstream import Echo


def make_cfg(tmp: Path, port: int, names: list[str], prometheus: str | None = None) -> ValidConfig:
    services = [ServiceSpec(name=n, upstream=f"http://127.0.0.1:{port}", plaintext=True) for n in names]
    return validate(
        SidecarSpec(services=services, state_dir=str(tmp / "state"), prometheus_addr=prometheus), {}
    )


def make_sidecar(caddy_bin: str, tmp: Path, cfg: ValidConfig) -> Sidecar:
    override = {s.name: f"unix/{tmp / s.name}.sock" for s in cfg.services}
    engine = CaddyEngine(
        binary=caddy_bin,
        engine_dir=cfg.engine_dir,
        env={"PATH": os.environ.get("PATH", "")},
        listen_override=override,
    )
    return Sidecar(cfg=cfg, engine=engine, handle_signals=False)


async def get(tmp: Path, name: str, path: str = "/") -> httpx.Response:
    transport = httpx.AsyncHTTPTransport(uds=str(tmp / f"{name}.sock"))
    async with httpx.AsyncClient(transport=transport, base_url=f"http://{name}") as client:
        return await client.get(path)


async def status(cfg: ValidConfig, path: str) -> tuple[int, bytes]:
    with trio.fail_after(10):
        r = await request_unix(cfg.health_socket, "GET", path)
    return r.status, r.body


async def test_engine_restarts_after_a_crash(
    caddy_bin: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor, "BACKOFF_START", 0.1)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(Echo().serve)
        cfg = make_cfg(tmp_path, port, ["alpha"])
        sidecar = make_sidecar(caddy_bin, tmp_path, cfg)
        with trio.fail_after(60):
            await nursery.start(sidecar.run)
            assert (await get(tmp_path, "alpha", "/before")).status_code == 200
            first_pid = sidecar.engine.pid
            sidecar.engine.kill()
            await sidecar.wait_engine_down()
            await sidecar.wait_engine()
            assert sidecar.restarts == 1
            assert sidecar.engine.pid != first_pid
            after = await get(tmp_path, "alpha", "/after")
            code, body = await status(cfg, "/status")
        nursery.cancel_scope.cancel()
    assert after.status_code == 200
    assert after.json()["path"] == "/after"
    assert code == 200
    assert b'"engine_restarts": 1' in body


async def test_reconfigure_adds_and_removes_services(caddy_bin: str, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(Echo().serve)
        cfg = make_cfg(tmp_path, port, ["alpha", "beta"])
        sidecar = make_sidecar(caddy_bin, tmp_path, cfg)
        with trio.fail_after(60):
            await nursery.start(sidecar.run)
            pid = sidecar.engine.pid
            new = make_cfg(tmp_path, port, ["alpha", "gamma"])
            assert isinstance(sidecar.engine.listen_override, dict)
            sidecar.engine.listen_override["gamma"] = f"unix/{tmp_path / 'gamma'}.sock"
            assert await sidecar.reconfigure(new)
            alpha = await get(tmp_path, "alpha")
            gamma = await get(tmp_path, "gamma")
            with pytest.raises(httpx.TransportError):
                await get(tmp_path, "beta")

            # a bad reconfiguration is refused and the running one stays: a config file that
            # does not validate, and one the engine cannot load (the listener cannot bind)
            def bad_file() -> ValidConfig:
                raise ConfigError([Problem("alpha.upstream", "not a valid URL")])

            sidecar.reload = bad_file
            assert not await sidecar.reconfigure()
            sidecar.engine.listen_override["delta"] = "unix//nonexistent/dir/delta.sock"
            assert not await sidecar.reconfigure(make_cfg(tmp_path, port, ["alpha", "delta"]))
            still = await get(tmp_path, "gamma")
        nursery.cancel_scope.cancel()
    assert alpha.status_code == gamma.status_code == still.status_code == 200
    assert sidecar.engine.pid == pid  # one engine throughout: nodes of kept services untouched
    assert [s.name for s in sidecar.cfg.services] == ["alpha", "gamma"]
    assert (Path(cfg.state_root) / "gamma" / ".harmonia-sidecar.lock").exists()
    assert "delta" not in {s.name for s in sidecar.cfg.services}


async def test_health_status_and_metrics(
    caddy_bin: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(Echo().serve)
        cfg = make_cfg(tmp_path, port, ["alpha"], prometheus="127.0.0.1:0")
        sidecar = make_sidecar(caddy_bin, tmp_path, cfg)
        with trio.fail_after(60):
            await nursery.start(sidecar.run)
            for path in ("/a", "/b", "/status/404", "/status/500"):
                await get(tmp_path, "alpha", path)
            health_code, health = await status(cfg, "/health")
            metrics_code, metrics = await status(cfg, "/metrics")
            assert sidecar.metrics_address is not None
            over_tcp = await request_tcp(*sidecar.metrics_address, "GET", "/health")
            status_exit = await trio.to_thread.run_sync(
                cli.run, ["status", "--health-socket", cfg.health_socket]
            )
        nursery.cancel_scope.cancel()
    assert over_tcp.status == 503
    assert over_tcp.json()["engine_up"] is True
    printed = capsys.readouterr().out
    assert status_exit == 1  # a node is not running
    assert "engine: up" in printed
    assert "alpha" in printed
    assert "starting" in printed
    # the engine runs, but without a tailnet listener no node gets addresses: not healthy
    assert health_code == 503
    assert b'"engine_up": true' in health
    assert metrics_code == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in parse(metrics.decode())}

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("harmonia_sidecar_engine_up") == 1
    assert value("harmonia_sidecar_engine_restarts_total") == 0
    assert value("harmonia_sidecar_requests_total", service="alpha", status_class="2xx") == 2
    assert value("harmonia_sidecar_requests_total", service="alpha", status_class="4xx") == 1
    assert value("harmonia_sidecar_requests_total", service="alpha", status_class="5xx") == 1
    assert value("harmonia_sidecar_request_duration_seconds_count", service="alpha") == 4
    assert value("harmonia_sidecar_response_bytes_total", service="alpha") > 0
    assert value("harmonia_sidecar_node_state", service="alpha", state="starting") == 1


async def test_one_sidecar_per_state_directory(caddy_bin: str, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(Echo().serve)
        cfg = make_cfg(tmp_path, port, ["alpha"])
        with trio.fail_after(60):
            await nursery.start(make_sidecar(caddy_bin, tmp_path, cfg).run)
            second = make_sidecar(caddy_bin, tmp_path / "other", cfg)
            with pytest.raises(ConfigError, match="in use by another harmonia-sidecar"):
                await second.run()
        nursery.cancel_scope.cancel()


def test_a_process_directory_is_taken_once(tmp_path: Path) -> None:
    cfg = validate(
        SidecarSpec(services=[ServiceSpec(name="a", upstream="http://127.0.0.1:1")], state_dir=str(tmp_path)),
        {},
    )
    held = lock_process_dir(cfg)
    try:
        with pytest.raises(ConfigError) as info:
            lock_process_dir(cfg)
        (problem,) = info.value.problems
        assert problem.key == "state root"
        assert f"{cfg.engine_dir!r}" in problem.message
        assert f"pid {os.getpid()}" in problem.message
        assert "TS_STATE_DIR" in problem.message and "--config" in problem.message
    finally:
        for f in held:
            f.close()
    for f in lock_process_dir(cfg):  # released: the next process may take it
        f.close()
