import hashlib

import pytest

from cache.hashes import nix32_encode, sha256_nix32
from cache.narinfo import NarInfo, NarLocation, PathInfo, fingerprint
from cache.push.upload import UploadRefused, check_signed, parse_nar_name, parse_uploaded
from cache.signing import SecretKey

STORE = "/nix/store"
H = "0" * 31 + "1"
PATH = f"{STORE}/{H}-hello-2.12"
DEP = f"{STORE}/{'a' * 32}-glibc-2.38"
NAR = b"nix-archive-1 pretend"
NAR_HASH = hashlib.sha256(NAR).digest()
FILE_HASH = hashlib.sha256(b"compressed bytes").digest()
BUILDER = SecretKey.generate("builder-1")
OTHER = SecretKey.generate("someone-else-1")


def info(**kw: object) -> PathInfo:
    fields: dict[str, object] = {
        "path": PATH,
        "nar_hash": NAR_HASH,
        "nar_size": len(NAR),
        "references": (DEP, PATH),
        "deriver": f"{STORE}/{'b' * 32}-hello-2.12.drv",
    }
    fields.update(kw)
    return PathInfo(**fields)  # type: ignore[arg-type]


def rendered(pi: PathInfo, key: SecretKey | None = BUILDER, compression: str = "xz") -> bytes:
    ext = {"xz": ".nar.xz", "zstd": ".nar.zst", "none": ".nar"}[compression]
    loc = NarLocation(f"nar/{nix32_encode(FILE_HASH)}{ext}", compression, FILE_HASH, 123)
    sigs = (key.signer().sign(fingerprint(pi)),) if key else ()
    return NarInfo(pi, loc, sigs).render().encode()


def test_what_nix_writes_parses_back() -> None:
    up = parse_uploaded(rendered(info()), H, STORE)
    assert up.info.path == PATH
    assert up.info.nar_hash == NAR_HASH and up.info.nar_size == len(NAR)
    assert up.info.references == tuple(sorted((DEP, PATH)))
    assert up.info.deriver == f"{STORE}/{'b' * 32}-hello-2.12.drv"
    assert up.nar.file_hash == FILE_HASH and up.nar.compression == "xz"
    assert up.file_size == 123
    assert check_signed(up.info, (BUILDER.public_key(),)) == list(up.info.sigs)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_compressions(compression: str) -> None:
    assert parse_uploaded(rendered(info(), compression=compression), H, STORE).compression == compression


def test_ca_path_and_no_deriver() -> None:
    pi = info(deriver=None, references=(), ca="fixed:r:sha256:" + nix32_encode(NAR_HASH))
    up = parse_uploaded(rendered(pi), H, STORE)
    assert up.info.ca == pi.ca and up.info.deriver is None and up.info.references == ()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.replace(f"StorePath: {PATH}", f"StorePath: {STORE}/{'c' * 32}-x"), "does not match"),
        (lambda t: t.replace(f"StorePath: {PATH}", "StorePath: /tmp/x"), "not in the store"),
        (lambda t: t.replace("URL: nar/", "URL: ../../etc/"), "URL"),
        (lambda t: t.replace("Compression: xz", "Compression: zstd"), "does not match the URL"),
        (lambda t: t.replace("Compression: xz", "Compression: lz4"), "Compression"),
        (lambda t: t.replace("NarSize: 21", "NarSize: 0"), "NarSize is 0"),
        (lambda t: t.replace("NarSize: 21", "NarSize: -4"), "not a number"),
        (lambda t: t.replace("NarHash: sha256:", "NarHash: md5:"), "NarHash"),
        (lambda t: t.replace("References: ", "References: ../etc "), "References"),
        (
            lambda t: t.replace(
                f"FileHash: {sha256_nix32(FILE_HASH)}", f"FileHash: {sha256_nix32(NAR_HASH)}"
            ),
            "FileHash",
        ),
        (lambda t: t.replace("NarHash", "NarHash: x\nNarHash"), "2 times"),
        (
            lambda t: "\n".join(line for line in t.splitlines() if not line.startswith("NarHash")),
            "no NarHash",
        ),
        (lambda t: t + "garbage line\n", "without"),
    ],
)
def test_refusals_are_400_and_say_why(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    body = mutate(rendered(info()).decode()).encode()
    with pytest.raises(UploadRefused, match=message) as exc:
        parse_uploaded(body, H, STORE)
    assert exc.value.status == 400


def test_unsigned_is_403_naming_the_expected_keys() -> None:
    up = parse_uploaded(rendered(info(), key=None), H, STORE)
    with pytest.raises(UploadRefused, match=r"not signed; sign it with one of these keys: builder-1") as exc:
        check_signed(up.info, (BUILDER.public_key(),))
    assert exc.value.status == 403


def test_unknown_key_is_403_naming_both() -> None:
    up = parse_uploaded(rendered(info(), key=OTHER), H, STORE)
    with pytest.raises(UploadRefused, match=r"signed by someone-else-1, expected one of: builder-1") as exc:
        check_signed(up.info, (BUILDER.public_key(),))
    assert exc.value.status == 403


def test_a_signature_over_other_metadata_is_refused() -> None:
    signed_for = info(nar_size=999)
    sig = BUILDER.signer().sign(fingerprint(signed_for))
    with pytest.raises(UploadRefused) as exc:
        check_signed(info(sigs=(sig,)), (BUILDER.public_key(),))
    assert exc.value.status == 403


def test_nar_names() -> None:
    name = nix32_encode(FILE_HASH)
    assert parse_nar_name(f"{name}.nar.zst").compression == "zstd"  # type: ignore[union-attr]
    assert parse_nar_name(f"{name}.nar").compression == "none"  # type: ignore[union-attr]
    assert parse_nar_name(f"{name}.nar.xz").name == f"{name}.nar.xz"  # type: ignore[union-attr]
    for bad in (f"{name}.tar", name, "x.nar", f"{name}.nar.xz/..", f"{name[:-1]}e.nar"):
        assert parse_nar_name(bad) is None
