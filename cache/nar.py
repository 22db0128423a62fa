"""The nix-archive-1 (NAR) format: a streaming encoder over filesystem entries, and `.ls` listings.

The encoder is pure: it turns a stream of entry events into NAR segments, either framing bytes
or a `FileRegion` (a regular file's contents, left to the transport: `os.sendfile` when it can,
reads otherwise). Memory stays constant whatever the size of the tree; only one directory's
sorted names are held at a time for each level being walked.

Format rules (Nix's): a string is its little-endian u64 length, the bytes, zero padding to 8.
Directory entries are sorted by name as bytes.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

MAGIC = "nix-archive-1"
# Files at most this size are read into the framing instead of becoming their own region:
# one syscall less per small file, and small pieces coalesce into larger writes.
INLINE_MAX = 64 * 1024
COALESCE = 256 * 1024


class NarError(Exception):
    """The tree cannot be archived (unsupported file type, vanished, unreadable)."""


@dataclass(frozen=True, slots=True)
class FileRegion:
    """`size` bytes of the regular file `path`, starting at `offset`."""

    path: bytes
    size: int
    offset: int = 0


Segment = bytes | FileRegion


def _str(data: bytes) -> bytes:
    pad = (-len(data)) % 8
    return struct.pack("<Q", len(data)) + data + b"\0" * pad


def _pad(n: int) -> bytes:
    return b"\0" * ((-n) % 8)


_OPEN = _str(b"(")
_CLOSE = _str(b")")
_HEADER = _str(MAGIC.encode()) + _OPEN + _str(b"type")
_REGULAR = _str(b"regular")
_EXEC = _str(b"executable") + _str(b"")
_CONTENTS = _str(b"contents")
_SYMLINK = _str(b"symlink") + _str(b"target")
_DIRECTORY = _str(b"directory")
_ENTRY = _str(b"entry") + _OPEN + _str(b"name")
_NODE = _str(b"node") + _OPEN + _str(b"type")


# --- entry events -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Regular:
    path: bytes
    size: int
    executable: bool


@dataclass(frozen=True, slots=True)
class Symlink:
    target: bytes


@dataclass(frozen=True, slots=True)
class DirStart:
    pass


@dataclass(frozen=True, slots=True)
class DirEntry:
    name: bytes


@dataclass(frozen=True, slots=True)
class EntryEnd:
    pass


@dataclass(frozen=True, slots=True)
class DirEnd:
    pass


Event = Regular | Symlink | DirStart | DirEntry | EntryEnd | DirEnd


def walk(root: bytes | str | Path) -> Iterator[Event]:
    """Filesystem → events, in NAR order. The only I/O in this module besides small reads."""
    path = os.fsencode(root)
    yield from _walk(path)


def _walk(path: bytes) -> Iterator[Event]:
    try:
        st = os.lstat(path)
    except FileNotFoundError as exc:
        raise NarError(f"{os.fsdecode(path)} vanished") from exc
    mode = st.st_mode
    if stat.S_ISREG(mode):
        yield Regular(path, st.st_size, bool(mode & stat.S_IXUSR))
    elif stat.S_ISLNK(mode):
        yield Symlink(os.readlink(path))
    elif stat.S_ISDIR(mode):
        yield DirStart()
        for name in sorted(os.listdir(path)):
            yield DirEntry(name)
            yield from _walk(path + b"/" + name)
            yield EntryEnd()
        yield DirEnd()
    else:
        raise NarError(f"{os.fsdecode(path)} has an unsupported file type")


def encode(events: Iterator[Event]) -> Iterator[Segment]:
    """Events → NAR segments. Small framing pieces are coalesced into larger byte strings."""
    buf = bytearray(_HEADER)
    for ev in events:
        if isinstance(ev, Regular):
            buf += _REGULAR
            if ev.executable:
                buf += _EXEC
            buf += _CONTENTS + struct.pack("<Q", ev.size)
            if ev.size <= INLINE_MAX:
                buf += _read_small(ev)
            else:
                yield bytes(buf)
                buf.clear()
                yield FileRegion(ev.path, ev.size)
            buf += _pad(ev.size) + _CLOSE
        elif isinstance(ev, Symlink):
            buf += _SYMLINK + _str(ev.target) + _CLOSE
        elif isinstance(ev, DirStart):
            buf += _DIRECTORY
        elif isinstance(ev, DirEntry):
            buf += _ENTRY + _str(ev.name) + _NODE
        elif isinstance(ev, EntryEnd):
            buf += _CLOSE
        else:  # DirEnd
            buf += _CLOSE
        if len(buf) >= COALESCE:
            yield bytes(buf)
            buf.clear()
    if buf:
        yield bytes(buf)


def _read_small(ev: Regular) -> bytes:
    # os calls, not open(): a buffered file costs four more syscalls (fstat, ioctl, lseek, a
    # second read), and a closure's NARs are mostly files of a few KiB
    try:
        fd = os.open(ev.path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NarError(f"{os.fsdecode(ev.path)} vanished") from exc
    try:
        data = os.read(fd, ev.size + 1)
        while len(data) < ev.size and (more := os.read(fd, ev.size + 1 - len(data))):  # short reads
            data += more
    finally:
        os.close(fd)
    if len(data) != ev.size:
        raise NarError(f"{os.fsdecode(ev.path)} changed size while archiving")
    return data


def nar_segments(root: bytes | str | Path) -> Iterator[Segment]:
    return encode(walk(root))


def segment_len(seg: Segment) -> int:
    return len(seg) if isinstance(seg, bytes) else seg.size


def slice_segments(segments: Iterator[Segment], start: int, length: int) -> Iterator[Segment]:
    """The byte range [start, start+length) of a segment stream, as segments."""
    pos = 0
    end = start + length
    for seg in segments:
        n = segment_len(seg)
        seg_end = pos + n
        if seg_end <= start:
            pos = seg_end
            continue
        if pos >= end:
            return
        lo = max(start, pos) - pos
        hi = min(end, seg_end) - pos
        if isinstance(seg, bytes):
            yield seg[lo:hi]
        else:
            yield FileRegion(seg.path, hi - lo, seg.offset + lo)
        pos = seg_end
        if pos >= end:
            return


def read_small_file(path: bytes, size: int) -> bytes | None:
    """A whole small file of `size` bytes in one read, or None (gone, unreadable, other size)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, size + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) == size else None


def read_region(region: FileRegion, chunk: int = 1 << 20) -> Generator[bytes, None, None]:
    """A region's bytes by reads, for transports that cannot `sendfile` (TLS, HTTP/2, zstd)."""
    with open(region.path, "rb") as f:
        f.seek(region.offset)
        left = region.size
        while left:
            data = f.read(min(chunk, left))
            if not data:
                raise NarError(f"{os.fsdecode(region.path)} shrank while being sent")
            left -= len(data)
            yield data


def nar_bytes(root: bytes | str | Path) -> bytes:
    """The whole NAR in memory: for tests and small trees only."""
    out = bytearray()
    for seg in nar_segments(root):
        if isinstance(seg, bytes):
            out += seg
        else:
            for data in read_region(seg):
                out += data
    return bytes(out)


# --- .ls listings -------------------------------------------------------------------------


def listing(root: bytes | str | Path) -> dict[str, object]:
    """The `.ls` document (version 1) with `narOffset` for regular files, as Nix writes it."""
    events = walk(root)
    offset = len(_HEADER)
    stack: list[dict[str, object]] = []
    names: list[str] = []
    result: dict[str, object] = {}

    def attach(node: dict[str, object]) -> None:
        if not stack:
            result.update(node)
        else:
            entries = stack[-1]["entries"]
            assert isinstance(entries, dict)
            entries[names[-1]] = node

    for ev in events:
        if isinstance(ev, Regular):
            offset += len(_REGULAR) + (len(_EXEC) if ev.executable else 0) + len(_CONTENTS) + 8
            node: dict[str, object] = {"type": "regular", "size": ev.size}
            if ev.executable:
                node["executable"] = True
            node["narOffset"] = offset
            attach(node)
            offset += ev.size + (-ev.size) % 8 + len(_CLOSE)
        elif isinstance(ev, Symlink):
            offset += len(_SYMLINK) + len(_str(ev.target)) + len(_CLOSE)
            attach({"type": "symlink", "target": os.fsdecode(ev.target)})
        elif isinstance(ev, DirStart):
            offset += len(_DIRECTORY)
            node = {"type": "directory", "entries": {}}
            attach(node)
            stack.append(node)
        elif isinstance(ev, DirEntry):
            offset += len(_ENTRY) + len(_str(ev.name)) + len(_NODE)
            names.append(os.fsdecode(ev.name))
        elif isinstance(ev, EntryEnd):
            offset += len(_CLOSE)
            names.pop()
        else:
            offset += len(_CLOSE)
            stack.pop()
    return {"version": 1, "root": result}
