"""The daemon protocol's pure parts: QueryPathInfo's answer parsed from a buffer in one go.
The real nix-daemon judges the whole client in tests/e2e/cache/test_daemon_protocol.py."""

from __future__ import annotations

import pytest

from cache.daemon import _Short, parse_path_info_reply, u64, wire_str, wire_strings


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
