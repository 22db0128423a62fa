"""cache.gcroots: the pure helpers table-driven, the operations on a real directory tree.

The store here is a plain directory standing in for the store *directory* (the helpers only look at
names and links); the real store and the real collector are exercised in tests/e2e/deploy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cache import gcroots
from cache.gcroots import PinError, parse_store_path, root_name

H1 = "0" * 32
H2 = "a" * 32
H3 = "z" * 32


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (f"/nix/store/{H1}-hello-2.12", f"{H1}-hello-2.12"),
        (f"/nix/store/{H2}-x", f"{H2}-x"),
        # every digit of Nix's base 32 (m included; e, o, u, t are not digits)
        ("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-a", "0123456789abcdfghijklmnpqrsvwxyz-a"),
        (f"/nix/store/{H2}-a+b_c.d?e=f", f"{H2}-a+b_c.d?e=f"),
        (f"/nix/store//{H1}-hello/", f"{H1}-hello"),  # normalised
    ],
)
def test_root_name_is_the_base_name(path: str, expected: str) -> None:
    assert root_name(parse_store_path(path)) == expected


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("", "not a store path"),
        ("/nix/store", "not a store path"),
        ("/nix/store/", "not a store path"),
        ("/tmp/x", "not a store path"),
        (f"/nix/storex/{H1}-a", "not a store path"),
        (f"/nix/store/{H1}", "not a store path"),  # no name
        (f"/nix/store/{H1}-", "not a store path"),  # empty name
        (f"/nix/store/{'e' * 32}-a", "not a store path"),  # e is not a nix32 digit
        (f"/nix/store/{'u' * 32}-a", "not a store path"),
        (f"/nix/store/{'A' * 32}-a", "not a store path"),
        (f"/nix/store/{H1[:31]}-a", "not a store path"),
        (f"/nix/store/{H1}-.hidden", "not a store path"),
        (f"/nix/store/{H1}-a b", "not a store path"),
        (f"/nix/store/{H1}-a/bin/hello", "inside the store path"),
        (f"/nix/store/../etc/{H1}-a", "not a store path"),
        (f"nix/store/{H1}-a", "not a store path"),
    ],
)
def test_parse_store_path_rejects(path: str, message: str) -> None:
    with pytest.raises(PinError, match=message):
        parse_store_path(path)


def test_parse_store_path_with_another_store_dir() -> None:
    sp = parse_store_path(f"/gnu/store/{H1}-a", "/gnu/store/")
    assert str(sp) == f"/gnu/store/{H1}-a"
    with pytest.raises(PinError):
        parse_store_path(f"/nix/store/{H1}-a", "/gnu/store")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    d = tmp_path / "store"
    d.mkdir()
    (d / f"{H1}-one").mkdir()
    (d / f"{H2}-two").write_text("two")
    (d / f"{H3}-link").symlink_to(f"{H1}-one")  # a store path may itself be a symlink
    return d


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    return tmp_path / "gcroots" / "harmonia"


def test_pin_creates_links_named_after_the_path(store: Path, roots: Path) -> None:
    p1, p2 = f"{store}/{H1}-one", f"{store}/{H2}-two"
    results = gcroots.pin([p1, p2], gcroots_dir=roots, store_dir=str(store))
    assert [r.changed for r in results] == [True, True]
    assert os.readlink(roots / f"{H1}-one") == p1
    assert os.readlink(roots / f"{H2}-two") == p2
    assert sorted(os.listdir(roots)) == [f"{H1}-one", f"{H2}-two"]  # no temporary files left
    assert [p.store_path for p in gcroots.list_pins(gcroots_dir=roots, store_dir=str(store))] == [
        p1,
        p2,
    ]


def test_pin_is_idempotent_and_deduplicates(store: Path, roots: Path) -> None:
    p1 = f"{store}/{H1}-one"
    gcroots.pin([p1], gcroots_dir=roots, store_dir=str(store))
    again = gcroots.pin([p1, p1], gcroots_dir=roots, store_dir=str(store))
    assert [r.changed for r in again] == [False]


def test_pin_a_store_path_that_is_a_symlink_pins_that_path(store: Path, roots: Path) -> None:
    p3 = f"{store}/{H3}-link"
    gcroots.pin([p3], gcroots_dir=roots, store_dir=str(store))
    assert os.readlink(roots / f"{H3}-link") == p3


def test_pin_follows_a_result_link_outside_the_store(store: Path, roots: Path, tmp_path: Path) -> None:
    result = tmp_path / "result"
    result.symlink_to(store / f"{H1}-one")
    [r] = gcroots.pin([str(result)], gcroots_dir=roots, store_dir=str(store))
    assert r.pin.store_path == f"{store}/{H1}-one"


def test_pin_checks_every_path_before_changing_anything(store: Path, roots: Path) -> None:
    good = f"{store}/{H1}-one"
    absent = f"{store}/{'1' * 32}-absent"
    with pytest.raises(PinError, match="is not in the store"):
        gcroots.pin([good, absent], gcroots_dir=roots, store_dir=str(store))
    with pytest.raises(PinError, match="not a store path"):
        gcroots.pin([good, "/etc/passwd"], gcroots_dir=roots, store_dir=str(store))
    assert not roots.exists()


def test_pin_refuses_to_overwrite_a_foreign_root(store: Path, roots: Path) -> None:
    roots.mkdir(parents=True)
    (roots / f"{H1}-one").symlink_to("/somewhere/else")
    with pytest.raises(PinError, match="remove it by hand"):
        gcroots.pin([f"{store}/{H1}-one"], gcroots_dir=roots, store_dir=str(store))
    assert os.readlink(roots / f"{H1}-one") == "/somewhere/else"


def test_pin_refuses_a_non_symlink_in_the_way(store: Path, roots: Path) -> None:
    roots.mkdir(parents=True)
    (roots / f"{H1}-one").write_text("")
    with pytest.raises(PinError, match="not a symlink"):
        gcroots.pin([f"{store}/{H1}-one"], gcroots_dir=roots, store_dir=str(store))


def test_pin_reports_an_unwritable_roots_directory(store: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PinError, match="cannot create the roots directory"):
        gcroots.pin([f"{store}/{H1}-one"], gcroots_dir=blocker / "roots", store_dir=str(store))


def test_pin_nothing_is_an_error(roots: Path, store: Path) -> None:
    with pytest.raises(PinError, match="nothing to pin"):
        gcroots.pin([], gcroots_dir=roots, store_dir=str(store))


def test_unpin_removes_only_the_named_roots(store: Path, roots: Path) -> None:
    p1, p2 = f"{store}/{H1}-one", f"{store}/{H2}-two"
    gcroots.pin([p1, p2], gcroots_dir=roots, store_dir=str(store))
    [r] = gcroots.unpin([p1], gcroots_dir=roots, store_dir=str(store))
    assert r.changed
    assert os.listdir(roots) == [f"{H2}-two"]


def test_unpin_a_path_not_pinned(store: Path, roots: Path) -> None:
    p1, p2 = f"{store}/{H1}-one", f"{store}/{H2}-two"
    gcroots.pin([p1], gcroots_dir=roots, store_dir=str(store))
    with pytest.raises(PinError, match="is not pinned"):
        gcroots.unpin([p1, p2], gcroots_dir=roots, store_dir=str(store))
    assert os.listdir(roots) == [f"{H1}-one"]  # nothing removed
    results = gcroots.unpin([p1, p2], gcroots_dir=roots, store_dir=str(store), missing_ok=True)
    assert [r.changed for r in results] == [True, False]


def test_unpin_a_root_whose_path_is_gone(store: Path, roots: Path) -> None:
    p2 = f"{store}/{H2}-two"
    gcroots.pin([p2], gcroots_dir=roots, store_dir=str(store))
    (store / f"{H2}-two").unlink()
    [listed] = gcroots.list_pins(gcroots_dir=roots, store_dir=str(store))
    assert not listed.exists
    [r] = gcroots.unpin([p2], gcroots_dir=roots, store_dir=str(store))
    assert r.changed
    assert not r.pin.exists


def test_unpin_refuses_a_foreign_root(store: Path, roots: Path) -> None:
    roots.mkdir(parents=True)
    (roots / f"{H1}-one").symlink_to("/somewhere/else")
    with pytest.raises(PinError, match="remove it by hand"):
        gcroots.unpin([f"{store}/{H1}-one"], gcroots_dir=roots, store_dir=str(store))
    assert (roots / f"{H1}-one").is_symlink()


def test_list_pins_ignores_what_is_not_ours(store: Path, roots: Path) -> None:
    p1 = f"{store}/{H1}-one"
    gcroots.pin([p1], gcroots_dir=roots, store_dir=str(store))
    (roots / "other").symlink_to(p1)  # name does not match the target
    (roots / "elsewhere").symlink_to("/etc")
    (roots / "file").write_text("")
    (roots / f".{H2}-two.1.tmp").symlink_to(f"{store}/{H2}-two")
    assert [p.store_path for p in gcroots.list_pins(gcroots_dir=roots, store_dir=str(store))] == [p1]


def test_list_pins_of_a_missing_directory_is_empty(tmp_path: Path) -> None:
    assert gcroots.list_pins(gcroots_dir=tmp_path / "absent") == []


def test_defaults_follow_the_nix_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NIX_STATE_DIR", raising=False)
    monkeypatch.delenv("NIX_STORE_DIR", raising=False)
    assert gcroots.default_gcroots_dir() == Path("/nix/var/nix/gcroots/harmonia")
    assert gcroots.default_store_dir() == "/nix/store"
    monkeypatch.setenv("NIX_STATE_DIR", "/var/nix")
    monkeypatch.setenv("NIX_STORE_DIR", "/gnu/store")
    assert gcroots.default_gcroots_dir() == Path("/var/nix/gcroots/harmonia")
    assert gcroots.default_store_dir() == "/gnu/store"


# --- the command line ---------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], store: Path, roots: Path, *argv: str) -> tuple[int, str, str]:
    cmd, *rest = argv
    code = gcroots.run_pins_command([cmd, "--gcroots-dir", str(roots), "--store-dir", str(store), *rest])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_pin_pins_unpin(capsys: pytest.CaptureFixture[str], store: Path, roots: Path) -> None:
    p1, p2 = f"{store}/{H1}-one", f"{store}/{H2}-two"
    code, out, err = _cli(capsys, store, roots, "pin", p1, p2)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"pinned {p1} (root {roots / f'{H1}-one'})",
        f"pinned {p2} (root {roots / f'{H2}-two'})",
    ]
    assert _cli(capsys, store, roots, "pins") == (0, f"{p1}\n{p2}\n", "")
    code, out, _ = _cli(capsys, store, roots, "pins", "--json")
    assert code == 0
    assert json.loads(out) == [
        {"root": str(roots / f"{H1}-one"), "storePath": p1, "exists": True},
        {"root": str(roots / f"{H2}-two"), "storePath": p2, "exists": True},
    ]
    assert _cli(capsys, store, roots, "unpin", p1) == (0, f"unpinned {p1}\n", "")
    assert _cli(capsys, store, roots, "pins") == (0, f"{p2}\n", "")


def test_cli_errors_are_clear(capsys: pytest.CaptureFixture[str], store: Path, roots: Path) -> None:
    code, out, err = _cli(capsys, store, roots, "pin", "/etc/passwd")
    assert (code, out) == (1, "")
    assert err.startswith("harmonia-cache pin: error: not a store path")
    code, _, err = _cli(capsys, store, roots, "unpin", f"{store}/{H1}-one")
    assert code == 1
    assert "is not pinned" in err
    code, out, err = _cli(capsys, store, roots, "unpin", "--missing-ok", f"{store}/{H1}-one")
    assert (code, out, err) == (0, f"was not pinned {store}/{H1}-one\n", "")


@pytest.mark.parametrize("argv", [[], ["pin"], ["unpin"], ["frobnicate"], ["pins", "extra"]])
def test_cli_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert gcroots.run_pins_command(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "usage: harmonia-cache" in err
    assert "error:" in err


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert gcroots.run_pins_command(["pin", "--help"]) == 0
    assert "store path" in capsys.readouterr().out
