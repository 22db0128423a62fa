"""The daemon protocol's pure parts: log messages and QueryPathInfo's answer parsed from a buffer
in one go, and when a query may wait for its answer outside trio's loop. The real nix-daemon
judges the whole client in tests/e2e/cache/test_daemon_protocol.py."""

from __future__ import annotations

import pytest

from cache.daemon import (
    STDERR_ERROR,
    STDERR_LAST,
    STDERR_NEXT,
    STDERR_READ,
    STDERR_RESULT,
    STDERR_START_ACTIVITY,
    STDERR_STOP_ACTIVITY,
    DaemonError,
    QuickReplies,
    _Short,
    after_log_messages,
    parse_path_info_reply,
    u64,
    wire_str,
    wire_strings,
)


def reply(minor: int, valid: bool = True) -> bytes:
    head = u64(1 if valid else 0) if minor >= 17 else b""
    if not valid:
        return head
    body = (
        wire_str("/nix/store/aaaa-deriver.drv")
        + wire_str("sha256:" + "ab" * 32)
        + wire_strings(["/nix/store/bbbb-ref", "/nix/store/cccc-other"])
        + u64(1700000000)
        + u64(4242)
    )
    if minor >= 16:
        body += u64(0) + wire_strings(["key-1:c2ln"]) + wire_str("")
    return head + body


@pytest.mark.parametrize("minor", [15, 16, 17, 37])
def test_a_whole_answer_parses_and_says_where_it_ends(minor: int) -> None:
    raw = bytearray(b"X" * 8 + reply(minor) + b"next")
    end, fields = parse_path_info_reply(raw, 8, minor)
    assert raw[end:] == b"next"
    assert fields is not None
    deriver, nar_hash, refs, reg_time, nar_size, sigs, ca = fields
    assert (deriver, nar_hash, reg_time, nar_size, ca) == (
        "/nix/store/aaaa-deriver.drv",
        "sha256:" + "ab" * 32,
        1700000000,
        4242,
        "",
    )
    assert refs == ["/nix/store/bbbb-ref", "/nix/store/cccc-other"]
    assert sigs == (["key-1:c2ln"] if minor >= 16 else [])


def test_an_invalid_path_and_every_cut_answer() -> None:
    assert parse_path_info_reply(bytearray(reply(37, valid=False)), 0, 37) == (8, None)
    whole = reply(37)
    for cut in range(len(whole)):  # any shorter buffer asks for more, never misreads
        with pytest.raises(_Short):
            parse_path_info_reply(bytearray(whole[:cut]), 0, 37)


def activity() -> bytes:
    fields = u64(2) + u64(0) + u64(7) + u64(1) + wire_str("text field")
    return u64(STDERR_START_ACTIVITY) + u64(1) + u64(3) + u64(100) + wire_str("copying") + fields + u64(0)


def log_messages() -> bytes:
    return (
        u64(STDERR_NEXT)
        + wire_str("warning: something")
        + activity()
        + u64(STDERR_RESULT)
        + u64(1)
        + u64(105)
        + u64(1)
        + u64(0)
        + u64(9)
        + u64(STDERR_STOP_ACTIVITY)
        + u64(1)
    )


def test_log_messages_before_an_answer_are_passed_over() -> None:
    raw = bytearray(log_messages() + u64(STDERR_LAST) + reply(34))
    start = after_log_messages(raw, 0, 34)
    assert start == len(raw) - len(reply(34))
    assert after_log_messages(bytearray(u64(STDERR_LAST)), 0, 34) == 8
    whole = log_messages() + u64(STDERR_LAST)
    for cut in range(len(whole)):  # any shorter buffer asks for more
        with pytest.raises(_Short):
            after_log_messages(bytearray(whole[:cut]), 0, 34)


def error_message(minor: int) -> bytes:
    text = "path '\x1b[35;1m/tmp/x\x1b[0m' is not in the Nix store"
    if minor < 26:
        return u64(STDERR_ERROR) + wire_str(text) + u64(1)
    return (
        u64(STDERR_ERROR) + wire_str("Error") + u64(0) + wire_str("Error") + wire_str(text) + u64(0) + u64(0)
    )


@pytest.mark.parametrize("minor", [21, 34, 37])
def test_a_daemon_error_is_raised_with_its_message_without_colours(minor: int) -> None:
    with pytest.raises(DaemonError, match=r"^path '/tmp/x' is not in the Nix store$"):
        after_log_messages(bytearray(u64(STDERR_NEXT) + wire_str("hi") + error_message(minor)), 0, minor)
    whole = error_message(minor)
    for cut in range(len(whole)):
        with pytest.raises(_Short):
            after_log_messages(bytearray(whole[:cut]), 0, minor)


@pytest.mark.parametrize(
    ("message", "says"),
    [
        (u64(STDERR_READ), "data transfer"),
        (u64(0x1234), "unknown message 0x1234"),
        (u64(STDERR_RESULT) + u64(1) + u64(105) + u64(1) + u64(5) + u64(0), "unknown log field type 5"),
    ],
)
def test_what_a_query_cannot_handle_is_a_daemon_error(message: bytes, says: str) -> None:
    with pytest.raises(DaemonError, match=says):
        after_log_messages(bytearray(message), 0, 34)


def test_quick_replies_stop_for_a_while_after_a_late_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("cache.daemon.time.monotonic", lambda: now[0])
    quick = QuickReplies()
    assert quick.allowed(1)
    assert not quick.allowed(2)  # another query in flight: the loop is not blocked for it
    quick.late()
    assert not quick.allowed(1)
    now[0] += QuickReplies.BACKOFF
    assert quick.allowed(1)
