"""Node status from tsnet's log and state: the short key tag and the ``netmap: self`` line."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from sidecar.nodestate import (
    parse_self_netmap,
    read_node_short_id,
    short_id_from_private_key,
)

# Seen on the local tailnet: tsnet logged "netmap: self: [N9+Qk] …" for the node whose
# tailscaled.state holds this private node key.
PRIVATE = "privkey:6881aaff3ff35e03a6b021b53d54807dff84e2d5afd7afe6b25a39c6fc6cbc5a"
SHORT = "N9+Qk"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write_state(node_dir: Path, private: str) -> None:
    """The layout tsnet's file store writes: every value base64, prefs as JSON."""
    node_dir.mkdir(parents=True, exist_ok=True)
    prefs = {"Hostname": "echo", "Config": {"PrivateNodeKey": private, "NodeID": "n1CNTRL"}}
    state = {
        "_current-profile": b64("profile-df4f"),
        "_machinekey": b64("privkey:00"),
        "profile-df4f": b64(json.dumps(prefs)),
    }
    (node_dir / "tailscaled.state").write_text(json.dumps(state))


def test_short_id_matches_what_tsnet_logs() -> None:
    assert short_id_from_private_key(PRIVATE) == SHORT


def test_state_file(tmp_path: Path) -> None:
    assert read_node_short_id(str(tmp_path / "none")) is None
    write_state(tmp_path / "echo", PRIVATE)
    assert read_node_short_id(str(tmp_path / "echo")) == SHORT
    write_state(tmp_path / "zero", "privkey:" + "0" * 64)  # not logged in yet
    assert read_node_short_id(str(tmp_path / "zero")) is None
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tailscaled.state").write_text("{not json")
    assert read_node_short_id(str(tmp_path / "junk")) is None


def test_self_netmap_line() -> None:
    message = (
        "control: [v1] new network map (periodic):\nnetmap: self: [N9+Qk] "
        "auth=machine-authorized u=tester@example.com [100.64.0.2/32 fd7a:115c:a1e0::2/128]\n"
    )
    found = parse_self_netmap(message)
    assert found is not None
    assert found.short_id == SHORT
    assert found.addresses == ("100.64.0.2", "fd7a:115c:a1e0::2")


def test_peer_lines_are_not_self() -> None:
    assert parse_self_netmap("[v1] netmap diff:\n+ [EMAvw] D900 100.64.0.2 fd7a::2/128 : \n") is None
    assert parse_self_netmap("AuthLoop: state is Running; done") is None
