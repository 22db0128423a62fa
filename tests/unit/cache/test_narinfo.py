import json

from cache.hashes import parse_sha256
from cache.narinfo import NarInfo, NarLocation, PathInfo, cache_info, parse_narinfo

INFO = PathInfo(
    path="/nix/store/0b2mf4iw52fffdfi5016hzwq9nli95qp-hc-tree",
    nar_hash=parse_sha256("sha256-jf4VosR9YdzFRzGfkFSoMyOashHkiQM8kdY55Y6iFI0="),
    nar_size=215608,
    references=(
        "/nix/store/dbr886k35v7sv2nl6mqa3zqc7vci4kin-hc-dep",
        "/nix/store/0b2mf4iw52fffdfi5016hzwq9nli95qp-hc-tree",
    ),
    deriver="/nix/store/kwia9jw5yksbxdshhyh6pwghpp0pkbpl-hc-tree.drv",
)


def test_render_in_nix_order() -> None:
    text = NarInfo(INFO, NarLocation("nar/x.nar?hash=0b2mf4iw52fffdfi5016hzwq9nli95qp"), ("k:sig",)).render()
    keys = [line.split(":", 1)[0] for line in text.splitlines()]
    assert keys == ["StorePath", "URL", "Compression", "NarHash", "NarSize", "References", "Deriver", "Sig"]
    assert text.endswith("\n")
    fields = parse_narinfo(text)
    assert fields["Compression"] == ["none"]
    assert fields["References"] == [
        "0b2mf4iw52fffdfi5016hzwq9nli95qp-hc-tree dbr886k35v7sv2nl6mqa3zqc7vci4kin-hc-dep"
    ]
    assert fields["Deriver"] == ["kwia9jw5yksbxdshhyh6pwghpp0pkbpl-hc-tree.drv"]
    assert fields["NarHash"][0].startswith("sha256:") and len(fields["NarHash"][0]) == 7 + 52


def test_empty_references_line_and_compressed_fields() -> None:
    info = PathInfo(
        "/nix/store/w4pr28v949dwc3ck68c7xbvrxb9519rr-c.toml",
        INFO.nar_hash,
        224,
        ca="fixed:r:sha256:1x2ira5016dfl42xp4v337ys8pa63jcilz2wdx87g8vlx8jia0sh",
    )
    loc = NarLocation("nar/y.nar.zst?hash=w4pr28v949dwc3ck68c7xbvrxb9519rr", "zstd", b"\1" * 32, 99)
    text = NarInfo(info, loc, ("a:1", "b:2")).render()
    assert "\nReferences: \n" in text
    assert "\nCompression: zstd\nFileHash: sha256:" in text
    assert "\nFileSize: 99\n" in text
    assert text.index("Sig: a:1") < text.index("Sig: b:2") < text.index("CA: fixed:")


def test_json_form() -> None:
    doc = json.loads(NarInfo(INFO, NarLocation("nar/x.nar"), ("k:s",)).to_json())
    assert doc["path"] == INFO.path
    assert doc["narSize"] == 215608
    assert doc["signatures"] == ["k:s"]
    assert doc["references"] == sorted(INFO.references)


def test_cache_info() -> None:
    assert cache_info("/nix/store", 60) == "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 60\n"
