import socket
from pathlib import Path

import pytest

from common.problems import ConfigError, Problem, raise_if
from common.systemd import notify


def test_one_problem_reads_as_one_line() -> None:
    error = ConfigError([Problem("zstd.level", "expected an integer from 1 to 22, got 99")])
    assert str(error) == "invalid configuration: zstd.level: expected an integer from 1 to 22, got 99"
    assert error.keys == ("zstd.level",)
    assert isinstance(error, ValueError)


def test_every_problem_is_listed_with_its_key() -> None:
    error = ConfigError([Problem("bind", "no host"), Problem("--max-body", "not a size")])
    assert str(error) == "invalid configuration (2 problems):\n  - bind: no host\n  - --max-body: not a size"


def test_an_error_needs_problems_objects() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ConfigError([])
    with pytest.raises(TypeError, match="Problem"):
        ConfigError(["bind: no host"])  # type: ignore[list-item]


def test_keys_are_data_not_text() -> None:
    inner = Problem("url", "scheme 'ftp' of 'ftp://x' is not http or https: see RFC 3986")
    assert inner.under("upstreams[1]") == Problem("upstreams[1].url", inner.message)
    assert inner.renamed("--upstream").key == "--upstream"
    raise_if([])
    with pytest.raises(ConfigError) as caught:
        raise_if([inner])
    assert caught.value.problems == (inner,)


def test_notify_reaches_the_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        assert notify("READY=1", {"NOTIFY_SOCKET": path})
        assert listener.recv(64) == b"READY=1"
    assert not notify("READY=1", {})
    assert not notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
