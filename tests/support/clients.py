"""The two real Nix clients the tests drive: Debian's Nix 2.8 on this machine, trixie's Nix 2.26 in a chroot.

    def test_copy(nix_client: NixClient, client_dir: Path) -> None:
        env = nix_client.env(client_dir / "xdg", "require-sigs = true\\n")
        nix_client.run(["nix", "copy", "--from", url, "--to", nix_client.inside(client_dir / "store"), path], env=env)

The chroot (built by `./bootstrap trixie`) shares this machine's network but not its files: every path a
client gets on its command line or in its environment is as that client sees it (`inside`), and what it
writes is found on this machine through `host`. Its store (`ROOT/nix/store`) is its own.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import stat
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from cache.hashes import nix32_encode

from .nix import BASE_NIX_CONFIG, have_nix, run

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TRIXIE_ROOT = Path("/var/cache/harmonia-bundle/trixie-nix")
# Variables of this machine's environment that would point the chrooted client at the wrong store or files.
_HOST_ONLY = re.compile(r"^(NIX_.*|XDG_.*|TMPDIR|TEMP|TMP|SSL_CERT_FILE|SSL_CERT_DIR|CURL_CA_BUNDLE)$")


def trixie_root() -> Path:
    return Path(os.environ.get("TRIXIE_ROOT") or DEFAULT_TRIXIE_ROOT)


def parse_version(output: str) -> str:
    """`nix (Nix) 2.26.3` -> `2.26.3`."""
    match = re.search(r"\b(\d+\.\d+(?:\.\d+)?)\b", output)
    if not match:
        raise ValueError(f"no version in {output!r}")
    return match.group(1)


def nar_hash_nix32(value: str) -> str:
    """A narHash as either client prints it, as `sha256:<nix32>`.

    Nix 2.8 prints `sha256:<nix32>`; from 2.19 `path-info --json` prints SRI `sha256-<base64>`.
    """
    if value.startswith("sha256-"):
        return "sha256:" + nix32_encode(base64.b64decode(value[len("sha256-") :], validate=True))
    if value.startswith("sha256:"):
        return value
    raise ValueError(f"not a sha256 narHash: {value!r}")


@dataclass(frozen=True)
class NixClient:
    name: str  # "nix-2.8" | "nix-2.26"
    version: str
    root: Path  # "/" for this machine's client, the chroot for trixie's

    @property
    def chrooted(self) -> bool:
        return self.root != Path("/")

    def inside(self, host_path: str | os.PathLike[str]) -> str:
        """The path as the client sees it; it must lie under the client's root."""
        path = PurePosixPath(os.path.normpath(os.path.abspath(host_path)))
        if not self.chrooted:
            return str(path)
        try:
            relative = path.relative_to(self.root)
        except ValueError:
            raise ValueError(f"{path} is outside {self.name}'s root {self.root}") from None
        return str(PurePosixPath("/") / relative)

    def host(self, inside_path: str | os.PathLike[str]) -> Path:
        """Where a path the client sees is on this machine."""
        path = PurePosixPath(os.fspath(inside_path))
        if not path.is_absolute():
            raise ValueError(f"{path} is not absolute")
        return self.root / os.path.normpath(path).lstrip("/")

    def env(self, cache_home: Path, extra_config: str = "", **extra: str) -> dict[str, str]:
        """Environment for one run: its own narinfo cache (a host path under root) and the base settings.

        Values in `extra` are passed as they are: give paths as the client sees them (`inside`).
        """
        cache_home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if self.chrooted:
            env = {k: v for k, v in env.items() if not _HOST_ONLY.match(k)}
            env["TMPDIR"] = "/tmp"
        env["XDG_CACHE_HOME"] = self.inside(cache_home)
        env["NIX_CONFIG"] = BASE_NIX_CONFIG + extra_config
        env.update(extra)
        return env

    def argv(self, args: list[str], netns: str | None = None) -> list[str]:
        """The command line that runs `args` (`nix …`, `nix-store …`) as this client."""
        command = ["chroot", str(self.root), *args] if self.chrooted else list(args)
        return ["ip", "netns", "exec", netns, *command] if netns else command

    def run(
        self,
        args: list[str],
        env: Mapping[str, str] | None = None,
        timeout: float = 300,
        check: bool = True,
        netns: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return run(self.argv(args, netns), env, timeout, check, label=f"[{self.name}] ")

    def path_info(self, path: str, env: Mapping[str, str], store: str | None = None) -> dict[str, Any]:
        """`nix path-info --json` of one path, the same shape from both clients (narHash as sha256:nix32)."""
        args = ["nix", "path-info", "--json", path]
        if store:
            args += ["--store", store]
        info = json.loads(self.run(args, env=env).stdout)
        found: dict[str, Any] = dict(info[0] if isinstance(info, list) else info[path])
        found["narHash"] = nar_hash_nix32(str(found["narHash"]))
        found.setdefault("signatures", [])
        return found


def host_client() -> NixClient:
    output = subprocess.run(["nix", "--version"], capture_output=True, text=True, check=True, timeout=30)
    return NixClient(name="nix-2.8", version=parse_version(output.stdout), root=Path("/"))


def ensure_trixie(root: Path) -> None:
    """`./bootstrap trixie`: builds the chroot when missing or broken, else only checks it and its mounts."""
    proc = subprocess.run(
        [str(REPO / "bootstrap"), "trixie"],
        env=dict(os.environ, TRIXIE_ROOT=str(root)),
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"./bootstrap trixie failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}", pytrace=False
        )


def trixie_client(root: Path) -> NixClient:
    ensure_trixie(root)
    output = subprocess.run(
        ["chroot", str(root), "nix", "--version"], capture_output=True, text=True, check=True, timeout=30
    )
    return NixClient(name="nix-2.26", version=parse_version(output.stdout), root=root)


def remove_tree(path: Path) -> None:
    """rm -rf for trees that hold Nix stores (their directories are read-only)."""
    if not path.exists():
        return
    for directory, _subdirs, _files in os.walk(path):
        mode = os.lstat(directory).st_mode
        if not mode & stat.S_IWUSR:
            os.chmod(directory, mode | stat.S_IWUSR)
    shutil.rmtree(path)


# --- fixtures (imported into tests/conftest.py) ---


@pytest.fixture(scope="session")
def host_nix_client() -> NixClient:
    if not have_nix():
        pytest.skip("Nix is not installed (the README's test command installs Debian's nix-bin)")
    return host_client()


@pytest.fixture(scope="session")
def trixie_nix_client() -> NixClient:
    return trixie_client(trixie_root())


@pytest.fixture(scope="session", params=["nix-2.8", "nix-2.26"])
def nix_client(request: pytest.FixtureRequest) -> NixClient:
    fixture = "host_nix_client" if request.param == "nix-2.8" else "trixie_nix_client"
    client: NixClient = request.getfixturevalue(fixture)
    return client


@pytest.fixture
def client_dir(nix_client: NixClient, tmp_path: Path) -> Iterator[Path]:
    """A fresh directory (host path) that `nix_client` can use: under tmp_path, or under the chroot's /tmp."""
    if not nix_client.chrooted:
        path = tmp_path / "client"
        path.mkdir()
        yield path
        return
    path = nix_client.root / "tmp" / f"harmonia-test-{uuid.uuid4().hex[:12]}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        remove_tree(path)
