import os
from pathlib import Path

from cache.push.retention import is_retained, list_roots, make_root, sweep, sweep_files

STORE = "/nix/store"
A = f"{STORE}/{'a' * 32}-a"
B = f"{STORE}/{'b' * 32}-b"


def test_a_root_per_path_named_after_it(tmp_path: Path) -> None:
    link = make_root(tmp_path / "roots", A)
    assert link == tmp_path / "roots" / f"{'a' * 32}-a"
    assert os.readlink(link) == A
    assert [r.store_path for r in list_roots(tmp_path / "roots", STORE)] == [A]


def test_expiry_from_the_links_mtime_and_renewal(tmp_path: Path) -> None:
    roots = tmp_path / "roots"
    link_a = make_root(roots, A)
    make_root(roots, B)
    pushed = os.lstat(link_a).st_mtime
    os.utime(link_a, (pushed - 100, pushed - 100), follow_symlinks=False)
    now = pushed + 1
    assert not is_retained(roots, A, STORE, 50, now)
    assert is_retained(roots, B, STORE, 50, now)
    removed = sweep(roots, STORE, 50, now)
    assert [r.store_path for r in removed] == [A]
    assert not os.path.lexists(link_a)
    assert [r.store_path for r in list_roots(roots, STORE)] == [B]
    make_root(roots, A)  # a new push renews
    assert is_retained(roots, A, STORE, 50, os.lstat(link_a).st_mtime + 1)


def test_foreign_entries_are_left_alone(tmp_path: Path) -> None:
    roots = tmp_path / "roots"
    roots.mkdir()
    os.symlink(A, roots / "not-its-name")
    (roots / "file").write_text("x")
    assert list_roots(roots, STORE) == []
    assert sweep(roots, STORE, 0.001, 10**12) == []
    assert sorted(p.name for p in roots.iterdir()) == ["file", "not-its-name"]


def test_abandoned_uploads_are_swept(tmp_path: Path) -> None:
    (tmp_path / "old").write_text("x")
    (tmp_path / "new").write_text("x")
    os.utime(tmp_path / "old", (1, 1))
    assert sweep_files(tmp_path, 3600, os.stat(tmp_path / "new").st_mtime) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["new"]
    assert sweep_files(tmp_path / "absent", 1, 0) == 0
