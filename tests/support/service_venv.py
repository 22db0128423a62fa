"""The bundle installed as a deployment installs it, for tests whose services run as another user.

docs/deploy.md installs with `python3 -m venv /opt/harmonia && /opt/harmonia/bin/pip install .`: a
non-editable install in a directory every user can read. The checkout's own `.venv` is an editable
install inside the checkout, which a service uid cannot read when the clone is private (`/root/project`,
mode 700). So those tests install this checkout the same way into a world-readable venv under
/var/cache/harmonia-bundle, once per version of the sources (a digest of what the package is built from).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVICE_VENVS = Path(os.environ.get("HARMONIA_SERVICE_VENVS", "/var/cache/harmonia-bundle/service-venvs"))
PACKAGES = ("cache", "caddy", "sidecar", "deploy", "bench")
BUILD_FILES = ("pyproject.toml", "README.md", "setup.py", "setup.cfg", "MANIFEST.in")
STALE_AFTER = 7 * 86400  # venvs of sources nobody ran for a week are removed


def _package_files(repo: Path) -> list[Path]:
    files = [repo / name for name in BUILD_FILES if (repo / name).is_file()]
    for package in PACKAGES:
        for path in sorted((repo / package).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.append(path)
    return files


def source_digest(repo: Path = REPO) -> str:
    """What `pip install .` would build from, hashed: names and contents."""
    digest = hashlib.sha256()
    for path in _package_files(repo):
        digest.update(str(path.relative_to(repo)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def _make_readable(root: Path) -> None:
    for directory, _subdirs, files in os.walk(root):
        os.chmod(directory, os.stat(directory).st_mode | 0o755)
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o444)


def _prune(keep: Path) -> None:
    now = time.time()
    for old in SERVICE_VENVS.iterdir():
        if old != keep and old.is_dir() and now - old.stat().st_mtime > STALE_AFTER:
            shutil.rmtree(old, ignore_errors=True)


def service_venv(repo: Path = REPO) -> Path:
    """The bin directory of a world-readable, non-editable install of `repo` (built when missing)."""
    target = SERVICE_VENVS / source_digest(repo)
    marker = target / ".installed"
    SERVICE_VENVS.mkdir(parents=True, exist_ok=True)
    os.chmod(SERVICE_VENVS, 0o755)
    os.chmod(SERVICE_VENVS.parent, os.stat(SERVICE_VENVS.parent).st_mode | 0o755)
    with (SERVICE_VENVS / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other checkouts may install at the same time
        if marker.exists():
            os.utime(target)
            return target / "bin"
        shutil.rmtree(target, ignore_errors=True)
        python = Path(sys.base_prefix) / "bin" / "python3"
        with tempfile.TemporaryDirectory(prefix="harmonia-src-") as src:
            # build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout
            for name in BUILD_FILES:
                if (repo / name).is_file():
                    shutil.copy(repo / name, Path(src) / name)
            for package in PACKAGES:
                shutil.copytree(
                    repo / package, Path(src) / package, ignore=shutil.ignore_patterns("__pycache__")
                )
            for command in (
                [str(python), "-m", "venv", str(target)],
                [str(target / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", src],
            ):
                done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
                if done.returncode != 0:
                    shutil.rmtree(target, ignore_errors=True)
                    raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
        _make_readable(target)
        marker.write_text(str(repo) + "\n")
        _prune(keep=target)
    return target / "bin"
