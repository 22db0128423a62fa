"""The pure parts of the test clients: path translation, command lines, environments, version and hash parsing."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from cache.hashes import nix32_encode
from tests.support.clients import NixClient, nar_hash_nix32, parse_version, remove_tree

HOST = NixClient(name="nix-2.8", version="2.8.0", root=Path("/"))
TRIXIE = NixClient(name="nix-2.26", version="2.26.3", root=Path("/var/cache/t"))


def test_host_client_sees_host_paths() -> None:
    assert not HOST.chrooted
    assert HOST.inside(Path("/tmp/x/store")) == "/tmp/x/store"
    assert HOST.host("/tmp/x") == Path("/tmp/x")


def test_chroot_paths_are_root_relative() -> None:
    assert TRIXIE.chrooted
    assert TRIXIE.inside(Path("/var/cache/t/tmp/a/store")) == "/tmp/a/store"
    assert TRIXIE.inside("/var/cache/t") == "/"
    assert TRIXIE.inside("/var/cache/t/tmp/../etc/nix") == "/etc/nix"
    assert TRIXIE.host("/tmp/a/store") == Path("/var/cache/t/tmp/a/store")
    assert TRIXIE.host("/") == Path("/var/cache/t")
    for path in ("/tmp/a", "/nix/store/x-y", "/etc/ssl/certs/ca.pem"):
        assert TRIXIE.inside(TRIXIE.host(path)) == path


def test_paths_outside_the_chroot_are_refused() -> None:
    with pytest.raises(ValueError, match=r"outside nix-2\.26's root"):
        TRIXIE.inside("/tmp/elsewhere")
    with pytest.raises(ValueError, match="outside"):
        TRIXIE.inside("/var/cache/tt/tmp")  # a sibling whose name starts the same
    with pytest.raises(ValueError, match="outside"):
        TRIXIE.inside("/var/cache/t/../x")
    with pytest.raises(ValueError, match="not absolute"):
        TRIXIE.host("tmp/a")


def test_argv() -> None:
    assert HOST.argv(["nix", "--version"]) == ["nix", "--version"]
    assert HOST.argv(["nix", "copy"], netns="ns1") == ["ip", "netns", "exec", "ns1", "nix", "copy"]
    assert TRIXIE.argv(["nix-store", "-q"]) == ["chroot", "/var/cache/t", "nix-store", "-q"]
    assert TRIXIE.argv(["nix", "copy"], netns="ns1") == [
        *["ip", "netns", "exec", "ns1"],
        *["chroot", "/var/cache/t", "nix", "copy"],
    ]


def test_env_for_the_chroot_drops_host_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIX_REMOTE", "daemon")
    monkeypatch.setenv("TMPDIR", "/somewhere/on/the/host")
    monkeypatch.setenv("SSL_CERT_FILE", "/host/ca.pem")
    client = NixClient(name="nix-2.26", version="2.26.3", root=tmp_path)
    env = client.env(tmp_path / "tmp" / "xdg", "require-sigs = true\n", NIX_SSL_CERT_FILE="/tmp/ca.pem")
    assert (tmp_path / "tmp" / "xdg").is_dir()
    assert env["XDG_CACHE_HOME"] == "/tmp/xdg"
    assert env["TMPDIR"] == "/tmp"
    assert "NIX_REMOTE" not in env and "SSL_CERT_FILE" not in env
    assert env["NIX_SSL_CERT_FILE"] == "/tmp/ca.pem"
    assert env["NIX_CONFIG"].endswith("\nrequire-sigs = true\n")
    assert "experimental-features = nix-command" in env["NIX_CONFIG"]


def test_env_for_the_host_keeps_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIX_REMOTE", "daemon")
    env = HOST.env(tmp_path / "xdg")
    assert env["XDG_CACHE_HOME"] == str(tmp_path / "xdg")
    assert env["NIX_REMOTE"] == "daemon"


def test_env_cache_home_must_be_inside_the_chroot(tmp_path: Path) -> None:
    client = NixClient(name="nix-2.26", version="2.26.3", root=tmp_path / "root")
    with pytest.raises(ValueError, match="outside"):
        client.env(tmp_path / "xdg")


def test_parse_version() -> None:
    assert parse_version("nix (Nix) 2.26.3\n") == "2.26.3"
    assert parse_version("nix (Nix) 2.8.0") == "2.8.0"
    with pytest.raises(ValueError, match="no version"):
        parse_version("command not found")


def test_nar_hash_from_either_client() -> None:
    digest = hashlib.sha256(b"nar").digest()
    nix32 = "sha256:" + nix32_encode(digest)
    assert nar_hash_nix32(nix32) == nix32
    assert nar_hash_nix32("sha256-" + base64.b64encode(digest).decode()) == nix32
    with pytest.raises(ValueError, match="not a sha256 narHash"):
        nar_hash_nix32("md5:abc")


def test_remove_tree_with_read_only_store_dirs(tmp_path: Path) -> None:
    store = tmp_path / "client" / "nix" / "store" / "abc-x"
    (store / "sub").mkdir(parents=True)
    (store / "sub" / "file").write_text("x")
    (store / "link").symlink_to("/nonexistent")
    for path in (store / "sub", store, store.parent):
        path.chmod(0o555)
    remove_tree(tmp_path / "client")
    assert not (tmp_path / "client").exists()
    remove_tree(tmp_path / "client")  # absent: nothing to do
