from pathlib import Path

import pytest

from cache.cli import main
from cache.push.tokens import TokenStore


def test_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "harmonia.toml"
    config.write_text(f'state_directory = "{tmp_path / "state"}"\n')
    assert main(["--config", str(config), "push-token", "create", "ci-1"]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert token.startswith("hcp_")
    assert "shown only now" in out.err
    store = TokenStore(tmp_path / "state" / "push" / "tokens.json")
    assert [e.name for e in store.entries()] == ["ci-1"]
    assert token not in store.path.read_text()

    assert main(["--config", str(config), "push-token", "list"]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith("ci-1\tcreated ") and token not in listed

    assert main(["--config", str(config), "push-token", "revoke", "ci-1"]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["--config", str(config), "push-token", "revoke", "ci-1"]) == 1
    assert "no token named 'ci-1'" in capsys.readouterr().err
    assert store.entries() == []


def test_tokens_file_from_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "harmonia.toml"
    config.write_text(f'[push]\ntokens_file = "{tmp_path / "t.json"}"\n')
    assert main(["--config", str(config), "push-token", "create", "a"]) == 0
    assert (tmp_path / "t.json").exists()
