"""``harmonia-sidecar``: publish local services on a tailnet, each as its own node.

    harmonia-sidecar --name harmonia [--plaintext] [--tag tag:x] … http://127.0.0.1:5000
    harmonia-sidecar --config sidecar.toml
    harmonia-sidecar status [--state-root D | --health-socket S] [--json]

Exit codes (for systemd): 0 stopped by SIGTERM/SIGINT; 1 unexpected error; 2 invalid
configuration (every problem is listed); 3 no usable engine, or it refused the configuration;
4 a node was not on the tailnet within the start-up timeout (``--timeout``).
``status`` exits 0 when every node runs, 1 when one does not, 3 when no sidecar answers.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from common.problems import ConfigError, Problem
from common.systemd import notify

from .authkey import API_ADDR_ENV, api_session_factory
from .control_http import request_unix
from .engine import CaddyEngine, EngineError, find_caddy
from .model import (
    CONTROL_SOCKET_NAME,
    INSTANCE_DIR_PREFIX,
    Secret,
    SidecarSpec,
    ValidConfig,
    default_state_root,
    validate,
)
from .spec import spec_from_argv, spec_from_toml
from .supervisor import Sidecar, StartupTimeout

log = logging.getLogger("harmonia-sidecar")

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_ENGINE, EXIT_TIMEOUT = 0, 1, 2, 3, 4
STATUS_UNREACHABLE = 3


def read_config_file(path: str) -> tuple[str, SidecarSpec]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        return path, SidecarSpec(
            parse_problems=[Problem("--config", f"cannot read {path!r}: {exc.strerror}")]
        )
    return path, spec_from_toml(text, origin=path)


def load(argv: Sequence[str], env: Mapping[str, str]) -> tuple[ValidConfig, bool]:
    """argv (and the config file it names) → a valid config; raises ConfigError."""
    result = spec_from_argv(argv, read_config=read_config_file)
    base = os.path.dirname(os.path.abspath(result.config_file)) if result.config_file else os.getcwd()
    try:
        return validate(result.spec, env, base_dir=base), result.print_config
    except ConfigError as exc:
        if result.config_file is not None:
            raise
        # one service from flags: name the flags, not the config keys
        names = {s.name or "service[0]" for s in result.spec.services}
        raise ConfigError([flag_problem(p, names) for p in exc.problems]) from None


def flag_problem(problem: Problem, service_names: set[str]) -> Problem:
    head, sep, option = problem.key.partition(".")
    if not sep or head not in service_names:
        if problem.key.startswith("-") or " " in problem.key:
            return problem
        return Problem("--" + problem.key.replace("_", "-"), problem.message)
    if option == "upstream":
        return Problem("upstream URL", problem.message)
    return Problem("--" + option.replace("_", "-"), problem.message)


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify); a failed send is logged, never fatal."""
    if not notify(message) and os.environ.get("NOTIFY_SOCKET"):
        log.warning("sd_notify %r: could not reach $NOTIFY_SOCKET", message.split("\n", 1)[0])


def control_sockets(state_root: str) -> list[str]:
    """The control sockets of the sidecar processes under ``state_root``: the root's own, and
    one per instance under the shared default root."""
    root = glob.escape(state_root)
    own = glob.glob(os.path.join(root, CONTROL_SOCKET_NAME))
    return own + sorted(glob.glob(os.path.join(root, INSTANCE_DIR_PREFIX + "*", CONTROL_SOCKET_NAME)))


def _status(argv: Sequence[str], env: Mapping[str, str]) -> int:
    p = argparse.ArgumentParser(
        prog="harmonia-sidecar status",
        description="Print each service's node, tailnet IPs and state (of every sidecar process "
        "under the state root, or of the one answering on --health-socket).",
    )
    p.add_argument("--state-root", metavar="DIR")
    p.add_argument("--health-socket", metavar="PATH")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    ns = p.parse_args(list(argv))
    root = ns.state_root or default_state_root(env)
    sockets = [ns.health_socket] if ns.health_socket else control_sockets(root)
    if not sockets:
        print(
            f"harmonia-sidecar status: no sidecar answers under {root} (no control socket)", file=sys.stderr
        )
        return STATUS_UNREACHABLE

    async def fetch(sock: str) -> bytes:
        with trio.fail_after(10):
            r = await request_unix(sock, "GET", "/status")
        return r.body

    answers: list[tuple[str, dict[str, Any]]] = []
    for sock in sockets:
        try:
            answers.append((sock, json.loads(trio.run(fetch, sock))))
        except (OSError, trio.TooSlowError) as exc:
            print(f"harmonia-sidecar status: no sidecar answers on {sock}: {exc}", file=sys.stderr)
    if not answers:
        return STATUS_UNREACHABLE
    if ns.json:
        # one process: its status as it is; several: keyed by their control sockets
        data: object = answers[0][1] if len(sockets) == 1 else {sock: d for sock, d in answers}
        print(json.dumps(data, indent=2))
    for sock, data in [] if ns.json else answers:
        if len(sockets) > 1:
            print(f"# {os.path.dirname(sock)}")
        print(
            f"engine: {'up' if data['engine_up'] else 'DOWN'} (pid {data['engine_pid']}, "
            f"{data['engine_restarts']} restart(s))"
        )
        rows = [("NODE", "STATE", "TAILNET IPS", "DETAIL")]
        rows += [(n["name"], n["state"], " ".join(n["addresses"]) or "-", n["detail"]) for n in data["nodes"]]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)), r[3])
    running = all(n["state"] == "running" for _, d in answers for n in d["nodes"])
    return 0 if running and len(answers) == len(sockets) else 1


async def _run(cfg: ValidConfig, argv: Sequence[str], binary: str) -> int:
    engine = CaddyEngine(binary=binary, engine_dir=cfg.engine_dir)

    def reload() -> ValidConfig:
        return load(argv, os.environ)[0]

    api_addr = os.environ.get(API_ADDR_ENV)
    sidecar = Sidecar(
        cfg=cfg,
        engine=engine,
        reload=reload,
        session_factory=api_session_factory(api_addr, os.environ.get("SSL_CERT_FILE")) if api_addr else None,
    )
    code = EXIT_OK
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as stop_signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                async for signum in stop_signals:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    sd_notify("STOPPING=1")
                    nursery.cancel_scope.cancel()

            nursery.start_soon(watch_signals)
            await nursery.start(sidecar.run)
            try:
                statuses = await sidecar.wait_running()
            except StartupTimeout as exc:
                log.error("%s", exc)
                code = EXIT_TIMEOUT
                nursery.cancel_scope.cancel()
                return code
            for st in statuses:
                log.info("%s: running on the tailnet at %s", st.name, ", ".join(st.addresses))
            sd_notify("READY=1\nSTATUS=" + ", ".join(f"{st.name} {st.addresses[0]}" for st in statuses))
    return code


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(sys.argv[1:] if argv is None else argv))


def run(argv: Sequence[str]) -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="harmonia-sidecar: %(levelname)s %(message)s"
    )
    if argv and argv[0] == "status":
        return _status(argv[1:], os.environ)
    try:
        cfg, print_config = load(argv, os.environ)
    except ConfigError as exc:
        print(f"harmonia-sidecar: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        binary = find_caddy(cfg.caddy)
    except EngineError as exc:
        print(f"harmonia-sidecar: {exc}", file=sys.stderr)
        return EXIT_ENGINE
    if print_config:
        engine = CaddyEngine(binary=binary, engine_dir=cfg.engine_dir)
        keys = {
            s.name: Secret("unread") if s.auth.path or s.auth.env_value or s.auth.credential else None
            for s in cfg.services
        }
        print(json.dumps(engine.render(cfg, keys, redact=True), indent=2))
        return EXIT_OK
    try:
        return trio.run(_run, cfg, argv, binary)
    except (ConfigError, EngineError, BaseExceptionGroup) as raised:
        inner = _single(raised)
        if isinstance(inner, ConfigError):
            print(f"harmonia-sidecar: {inner}", file=sys.stderr)
            return EXIT_CONFIG
        if isinstance(inner, EngineError):
            print(f"harmonia-sidecar: engine: {inner}", file=sys.stderr)
            return EXIT_ENGINE
        raise


def _single(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (trio's strict groups)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
