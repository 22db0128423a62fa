import base64
import os
import stat
from pathlib import Path

import pytest

from cache.push.tokens import (
    TokenError,
    TokenStore,
    basic_password,
    find_token,
    parse_store,
    render_store,
    token_digest,
)


def basic(login: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()


def test_create_prints_a_token_only_its_hash_is_kept(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "state" / "push" / "tokens.json")
    token = store.create("ci-runner-1")
    assert token.startswith("hcp_") and len(token) > 40
    text = store.path.read_text()
    assert token not in text
    assert token_digest(token) in text
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    assert [e.name for e in store.entries()] == ["ci-runner-1"]


def test_any_login_the_token_is_the_password(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    token = store.create("laptop")
    assert store.authenticate(basic("anyone", token)) == "laptop"
    assert store.authenticate(basic("laptop", token)) == "laptop"
    assert store.authenticate(basic("laptop", token + "x")) is None
    assert store.authenticate(None) is None
    assert store.authenticate(f"Bearer {token}") is None


def test_revoke_applies_without_restart(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    server_view = TokenStore(tmp_path / "tokens.json")  # another process's reader
    a = store.create("a")
    b = store.create("b")
    assert server_view.authenticate(basic("x", a)) == "a"
    store.revoke("a")
    assert server_view.authenticate(basic("x", a)) is None
    assert server_view.authenticate(basic("x", b)) == "b"
    with pytest.raises(TokenError, match="no token named 'a'"):
        store.revoke("a")


def test_names_are_unique_and_safe(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    store.create("a")
    with pytest.raises(TokenError, match="exists already"):
        store.create("a")
    for bad in ("", "with space", "../x", "-lead", "x" * 65):
        with pytest.raises(TokenError, match="token name"):
            store.create(bad)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (basic("u", "p"), "p"),
        (basic("u", "p:with:colons"), "p:with:colons"),
        ("basic " + base64.b64encode(b"u:p").decode(), "p"),
        (basic("u", ""), None),
        ("Basic !!!", None),
        ("Basic " + base64.b64encode(b"no-colon").decode(), None),
        ("Digest x", None),
        ("", None),
    ],
)
def test_basic_password(header: str, expected: str | None) -> None:
    assert basic_password(header) == expected


def test_store_file_round_trip_and_corrupt_file(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    token = store.create("a")
    entries = parse_store(store.path.read_text(), "x")
    assert parse_store(render_store(entries), "x") == entries
    assert find_token(entries, token) == "a"
    assert "sha256" not in repr(entries[0])
    store.path.write_text("{not json")
    os.utime(store.path, ns=(1, 1))
    with pytest.raises(TokenError, match="not a push token file"):
        store.entries()


def test_missing_file_means_no_tokens(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "absent.json")
    assert store.entries() == []
    assert store.authenticate(basic("u", "hcp_x")) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_root_gives_the_file_to_the_state_directorys_owner(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 61234, 61234)  # as systemd's DynamicUser owns /var/lib/private/harmonia
    store = TokenStore(state / "push" / "tokens.json")
    store.create("ci")
    for path in (state / "push", store.path):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (61234, 61234), path
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
