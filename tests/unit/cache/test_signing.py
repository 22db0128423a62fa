"""Keys and signatures against vectors made by Nix 2.8 itself (ed25519 signatures are deterministic)."""

import pytest

from cache.hashes import parse_sha256
from cache.narinfo import PathInfo, fingerprint, signatures
from cache.signing import KeyFormatError, PublicKey, SecretKey

# nix-store --generate-binary-cache-key vector-key-1 sk pk; nix store sign --key-file sk PATH
NIX_SECRET = (
    "vector-key-1:U5ZGZUEbFVmmF3wJx9bEdQK106nbJSvXDa4euhpwdr/GUCRlUzAHqakJ0Q2Z3jTPhNgZ0Tidw+YxmbuxfxeVIA=="
)
NIX_PUBLIC = "vector-key-1:xlAkZVMwB6mpCdENmd40z4TYGdE4ncPmMZm7sX8XlSA="
SIGNED = PathInfo(
    path="/nix/store/w4pr28v949dwc3ck68c7xbvrxb9519rr-c.toml",
    nar_hash=parse_sha256("sha256-UAMVJep0o3dQb1x8GpkcRl2k/Rljk9sFoa6ZAIrKUfQ="),
    nar_size=224,
)
NIX_SIG = (
    "vector-key-1:P75SiLbR3rljPlKTHcNl6/C7ub8P2tvc6B81tTya8Yg9vmWwwXTdN6wMHWBTdpSsoUpOVOxopXegL3OKH+FLBw=="
)


def test_fingerprint_format() -> None:
    info = PathInfo(
        path="/nix/store/0b2mf4iw52fffdfi5016hzwq9nli95qp-hc-tree",
        nar_hash=parse_sha256("sha256-jf4VosR9YdzFRzGfkFSoMyOashHkiQM8kdY55Y6iFI0="),
        nar_size=215608,
        references=(
            "/nix/store/dbr886k35v7sv2nl6mqa3zqc7vci4kin-hc-dep",
            "/nix/store/0b2mf4iw52fffdfi5016hzwq9nli95qp-hc-tree",
        ),
    )
    fp = fingerprint(info)
    assert fp.startswith("1;/nix/store/0b2mf4iw52fffdfi5016hzwq9nli95qp-hc-tree;sha256:")
    assert fp.endswith(
        ";215608;/nix/store/0b2mf4iw52fffdfi5016hzwq9nli95qp-hc-tree,"
        "/nix/store/dbr886k35v7sv2nl6mqa3zqc7vci4kin-hc-dep"
    )


def test_signature_matches_nix() -> None:
    key = SecretKey.parse(NIX_SECRET)
    assert str(key.public_key()) == NIX_PUBLIC
    assert signatures(SIGNED, [key.signer()]) == (NIX_SIG,)


def test_public_key_verifies_nix_signature() -> None:
    public = PublicKey.parse(NIX_PUBLIC)
    assert public.verify(fingerprint(SIGNED), NIX_SIG)
    assert not public.verify(fingerprint(SIGNED) + "x", NIX_SIG)
    assert not PublicKey.parse("other:" + NIX_PUBLIC.split(":")[1]).verify(fingerprint(SIGNED), NIX_SIG)


def test_generated_key_roundtrip() -> None:
    key = SecretKey.generate("harmonia-raider-1")
    again = SecretKey.parse(key.to_text())
    assert again.public_key() == key.public_key()
    sig = key.signer().sign("1;x;y;1;")
    assert key.public_key().verify("1;x;y;1;", sig)


def test_store_signature_of_same_name_is_replaced_others_kept() -> None:
    key = SecretKey.parse(NIX_SECRET)
    info = PathInfo(
        SIGNED.path,
        SIGNED.nar_hash,
        SIGNED.nar_size,
        sigs=("vector-key-1:stale==", "cache.nixos.org-1:abc=="),
    )
    assert signatures(info, [key.signer()]) == ("cache.nixos.org-1:abc==", NIX_SIG)


def test_secret_never_in_repr() -> None:
    key = SecretKey.parse(NIX_SECRET)
    secret_b64 = NIX_SECRET.split(":")[1]
    assert secret_b64 not in repr(key)
    assert secret_b64[:20] not in repr(key.signer())
    assert "U5ZGZ" not in repr(key) + str(vars(key.signer()) if hasattr(key.signer(), "__dict__") else "")


@pytest.mark.parametrize(
    "text",
    ["", "nocolon", ":abc", "name:not base64!", "name:" + "A" * 12, NIX_SECRET[:-8] + "AAAAAAA="],
)
def test_bad_secret_keys(text: str) -> None:
    with pytest.raises(KeyFormatError):
        SecretKey.parse(text)


@pytest.mark.parametrize("name", ["", "a:b", "with space"])
def test_bad_key_names(name: str) -> None:
    with pytest.raises(KeyFormatError):
        SecretKey.generate(name)
