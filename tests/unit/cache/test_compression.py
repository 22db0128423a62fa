from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
import zstandard

from cache.compression import (
    COPYLESS_MAX,
    MIN_COMPRESS_SIZE,
    CopyIndex,
    CopyStore,
    StateDirectoryError,
    compress_chunks,
    compress_whole,
    compressed_in_memory,
    condition,
    has_copy,
    iter_nar_bytes,
    looks_compressible,
)
from cache.nar import nar_bytes, nar_segments

NAR_HASH = bytes(range(32))


def _tree(root: Path) -> Path:
    (root / "tree" / "sub").mkdir(parents=True)
    (root / "tree" / "numbers").write_text("\n".join(str(i) for i in range(200_000)))
    (root / "tree" / "sub" / "small").write_text("hello\n")
    return root / "tree"


def test_the_live_stream_is_the_copy_byte_for_byte(tmp_path: Path) -> None:
    tree = os.fsencode(_tree(tmp_path))
    copies = CopyStore(tmp_path / "copies", 3, 1 << 30)
    made = copies.build(NAR_HASH, lambda: nar_segments(tree))
    assert made is not None
    live = b"".join(compress_chunks(iter_nar_bytes(nar_segments(tree)), 3))
    assert made.path.read_bytes() == live
    assert made.file_hash == hashlib.sha256(live).digest() and made.file_size == len(live)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(live) == nar_bytes(tree)
    assert copies.lookup(NAR_HASH) == made
    assert not list((tmp_path / "copies").glob("*.tmp"))


def test_a_small_nar_compressed_at_once_is_the_copy_byte_for_byte(tmp_path: Path) -> None:
    """The context kept between calls leaves nothing behind: every call gives the streamed bytes
    (and so the copy's, whose FileHash a narinfo may already carry), however the NAR is cut."""
    small = tmp_path / "small"
    small.mkdir()
    (small / "data").write_text("\n".join(str(i) for i in range(1500)))
    data = nar_bytes(os.fsencode(small))
    other = nar_bytes(os.fsencode(_tree(tmp_path)))[:20_000]
    for nar in (data, other, data, b"", data):
        expected = b"".join(compress_chunks(iter([nar]), 3))
        assert compress_whole(iter([nar]), 3) == expected
        assert compress_whole(iter([nar[:7], nar[7:100], nar[100:]]), 3) == expected
        assert zstandard.ZstdDecompressor().decompressobj().decompress(expected) == nar
    assert compress_whole(iter([data]), 5) == b"".join(compress_chunks(iter([data]), 5))


def test_a_nar_without_a_copy_is_compressed_in_memory_to_the_copys_bytes(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    (small / "data").write_text("\n".join(str(i) for i in range(1500)))
    root = os.fsencode(small)
    assert MIN_COMPRESS_SIZE < len(nar_bytes(root)) <= COPYLESS_MAX and not has_copy(len(nar_bytes(root)))
    assert has_copy(COPYLESS_MAX + 1)
    copy = CopyStore(tmp_path / "copies", 3, 1 << 30).build(NAR_HASH, lambda: nar_segments(root))
    assert copy is not None
    assert compressed_in_memory(lambda: nar_segments(root), 3) == copy.path.read_bytes()
    (small / "data").unlink()  # collected meanwhile: nothing to send, the route reports it
    small.rmdir()
    assert compressed_in_memory(lambda: nar_segments(root), 3) is None


def test_copies_of_nars_without_copies_are_swept_once(tmp_path: Path) -> None:
    """Copies an earlier version made of NARs up to COPYLESS_MAX (and their .meta) go; larger
    ones stay, however small on disk; a marker makes it once per state directory."""
    copies = CopyStore(tmp_path / "copies", 3, 1 << 30)
    small, zeros = tmp_path / "small", tmp_path / "zeros"
    small.mkdir()
    zeros.mkdir()
    (small / "data").write_text("\n".join(str(i) for i in range(1500)))
    (zeros / "data").write_bytes(bytes(10 << 20))  # a large NAR whose copy is tiny
    made = {
        name: copies.build(bytes([n]) * 32, lambda root=root: nar_segments(os.fsencode(root)))
        for n, (name, root) in enumerate((("small", small), ("zeros", zeros), ("tree", _tree(tmp_path))))
    }
    assert all(m is not None for m in made.values())
    assert (made["zeros"] is not None) and made["zeros"].file_size < COPYLESS_MAX
    assert copies.sweep_copyless() == 1
    assert copies.lookup(bytes([0]) * 32) is None and copies.meta(bytes([0]) * 32) is None
    assert copies.lookup(bytes([1]) * 32) == made["zeros"] and copies.lookup(bytes([2]) * 32) == made["tree"]
    # once: a small copy made afterwards (by hand, say) is left alone
    again = copies.build(bytes([0]) * 32, lambda: nar_segments(os.fsencode(small)))
    assert again is not None and copies.sweep_copyless() == 0 and copies.lookup(bytes([0]) * 32) == again


def test_an_evicted_copy_keeps_its_meta(tmp_path: Path) -> None:
    tree = os.fsencode(_tree(tmp_path))
    copies = CopyStore(tmp_path / "copies", 3, 0)  # every older copy is over the budget
    first = copies.build(NAR_HASH, lambda: nar_segments(tree))
    assert first is not None
    other = copies.build(b"\1" * 32, lambda: nar_segments(tree))
    assert other is not None
    assert copies.lookup(NAR_HASH) is None  # evicted by the second copy
    index = CopyIndex(copies)
    meta = index.meta(NAR_HASH)
    assert meta is not None and (meta.file_hash, meta.file_size) == (first.file_hash, first.file_size)
    assert index.copy(NAR_HASH) is None and index.copy(b"\1" * 32) is not None


def test_another_level_does_not_reuse_a_copy(tmp_path: Path) -> None:
    tree = os.fsencode(_tree(tmp_path))
    assert CopyStore(tmp_path / "copies", 3, 1 << 30).build(NAR_HASH, lambda: nar_segments(tree))
    assert CopyStore(tmp_path / "copies", 5, 1 << 30).meta(NAR_HASH) is None


def test_compressibility_is_judged_on_a_sample(tmp_path: Path) -> None:
    text = tmp_path / "text"
    text.write_text("\n".join(str(i) for i in range(100_000)))
    noise = tmp_path / "noise"
    noise.write_bytes(os.urandom(1 << 20))
    small_noise = tmp_path / "small-noise"
    small_noise.write_bytes(os.urandom(100_000))
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"x")
    assert looks_compressible(nar_segments(os.fsencode(text)))
    assert not looks_compressible(nar_segments(os.fsencode(noise)))
    assert not looks_compressible(nar_segments(os.fsencode(tiny)))
    # small NARs are offered compressed without a sample; large ones by their sample
    index = CopyIndex(CopyStore(tmp_path / "copies", 3, 1 << 30))
    assert index.compressible(b"\3" * 32, 100_000, lambda: nar_segments(os.fsencode(small_noise)))
    assert not index.compressible(b"\4" * 32, 1 << 20, lambda: nar_segments(os.fsencode(noise)))
    assert not index.compressible(b"\5" * 32, 100, lambda: nar_segments(os.fsencode(tiny)))


def test_an_unusable_state_directory_raises_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StateDirectoryError) as caught:
        CopyStore(tmp_path / "a-file" / "copies", 3, 1 << 30).build(NAR_HASH, lambda: iter([b"x" * 10_000]))
    assert caught.value.reason == "io-error"
    assert "a-file" in str(caught.value)


def test_conditions() -> None:
    assert condition(OSError(errno.ENOSPC, "full")) == "full"
    assert condition(OSError(errno.EROFS, "ro")) == "read-only"
    assert condition(OSError(errno.EIO, "io")) == "io-error"


def test_a_live_stream_kept_is_the_copy(tmp_path: Path) -> None:
    from cache.compression import LiveCopy

    tree = os.fsencode(_tree(tmp_path))
    copies = CopyStore(tmp_path / "copies", 3, 1 << 30)
    copies.dir.mkdir()
    keep = LiveCopy(copies, NAR_HASH)
    for block in compress_chunks(iter_nar_bytes(nar_segments(tree)), 3):
        keep.write(block)
    made = keep.finish()
    assert made is not None and copies.lookup(NAR_HASH) == made
    built = CopyStore(tmp_path / "other", 3, 1 << 30).build(NAR_HASH, lambda: nar_segments(tree))
    assert built is not None and built.path.read_bytes() == made.path.read_bytes()
    # a stream that does not reach its end leaves nothing
    cut = LiveCopy(copies, b"\2" * 32)
    cut.write(b"partial")
    cut.abort()
    assert sorted(p.name for p in copies.dir.iterdir()) == sorted(
        [made.path.name, copies.paths(NAR_HASH)[1].name]
    )
