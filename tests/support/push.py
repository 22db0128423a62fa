"""A nix-daemon of a test's own for pushes: its own socket and nix.conf, trusting no user.

The cache must never be a trusted user of its daemon, and tests run as root (trusted by the
system daemon's default `trusted-users = root`). This daemon serves the same host store, but
with `trusted-users =` empty, `require-sigs = true` and the test's pusher keys in
`trusted-public-keys`, so imports go through the checks an unprivileged cache user gets.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cache.hashes import NIX32_ALPHABET
from cache.nar import nar_bytes
from cache.narinfo import PathInfo, fingerprint
from cache.signing import SecretKey

SYSTEM_CONF = Path("/etc/nix/nix.conf")


@dataclass(frozen=True)
class PushDaemon:
    socket: Path
    conf_dir: Path
    log: Path

    @property
    def env(self) -> dict[str, str]:
        """For Nix commands talking to this daemon (`nix-store -q`, `nix-store --gc`)."""
        return dict(
            os.environ,
            NIX_REMOTE=f"unix://{self.socket}",
            NIX_CONF_DIR=str(self.conf_dir),
            NIX_DAEMON_SOCKET_PATH=str(self.socket),
        )


def _answers(daemon: PushDaemon) -> bool:
    probe = subprocess.run(
        ["nix", "store", "ping"], env=daemon.env, capture_output=True, timeout=20, check=False
    )
    return probe.returncode == 0


@contextlib.contextmanager
def untrusting_daemon(state: Path, trusted_keys: list[str]) -> Iterator[PushDaemon]:
    state.mkdir(parents=True, exist_ok=True)
    conf_dir = state / "conf"
    conf_dir.mkdir(exist_ok=True)
    base = SYSTEM_CONF.read_text() if SYSTEM_CONF.exists() else ""
    (conf_dir / "nix.conf").write_text(
        base
        + "\nexperimental-features = nix-command\nsubstituters =\n"
        + "trusted-users =\nallowed-users = *\nrequire-sigs = true\n"
        + f"trusted-public-keys = {' '.join(trusted_keys)}\n"
    )
    daemon = PushDaemon(state / "daemon.socket", conf_dir, state / "daemon.log")
    with contextlib.suppress(FileNotFoundError):
        daemon.socket.unlink()
    env = dict(daemon.env, XDG_CACHE_HOME=str(state / "xdg"))
    env.pop("NIX_REMOTE")
    with daemon.log.open("wb") as log:
        proc = subprocess.Popen(
            ["nix-daemon"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 30
            while not (daemon.socket.exists() and _answers(daemon)):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nix-daemon did not start:\n{daemon.log.read_text()}")
                time.sleep(0.1)
            yield daemon
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def random_hash_part() -> str:
    return "".join(secrets.choice(NIX32_ALPHABET) for _ in range(32))


@dataclass(frozen=True)
class MadePath:
    """An input-addressed store path nobody has: a NAR of a file, and its signed metadata."""

    info: PathInfo
    nar: bytes


def made_path(
    tmp: Path, name: str, content: str, key: SecretKey | None, references: tuple[str, ...] = ()
) -> MadePath:
    tmp.mkdir(parents=True, exist_ok=True)
    source = tmp / f"{name}-{secrets.token_hex(4)}"
    source.write_text(content)
    nar = nar_bytes(str(source))
    unsigned = PathInfo(
        f"/nix/store/{random_hash_part()}-{name}",
        hashlib.sha256(nar).digest(),
        len(nar),
        references=tuple(sorted(references)),
    )
    sigs = (key.signer().sign(fingerprint(unsigned)),) if key is not None else ()
    return MadePath(
        PathInfo(unsigned.path, unsigned.nar_hash, unsigned.nar_size, unsigned.references, sigs=sigs), nar
    )


def closure_expr(tag: str, count: int = 1) -> str:
    """`count` input-addressed paths, each referring to one shared dependency: a closure nobody
    else builds (the tag and a random salt go into every derivation)."""
    salt = secrets.token_hex(8)
    tops = " ".join(
        f'(mk "hc-push-{tag}-{i}" "/bin/echo {salt}-{i} $dep > $out" {{ inherit dep; }})'
        for i in range(count)
    )
    return (
        "let mk = name: script: extra: builtins.derivation ({ inherit name; system = builtins.currentSystem;"
        ' builder = "/bin/sh"; args = [ "-c" script ]; } // extra);'
        f' dep = mk "hc-push-{tag}-dep" "/bin/mkdir $out && /bin/echo {salt} > $out/file" {{}};'
        f" in [ dep {tops} ]"
    )


def basic_auth(token: str, login: str = "pusher") -> str:
    import base64

    return "Basic " + base64.b64encode(f"{login}:{token}".encode()).decode()
