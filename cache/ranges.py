"""HTTP Range requests (RFC 9110 §14), single ranges only. Pure.

A multi-range request is answered with the whole representation (allowed by the RFC), which
is what Nix and curl expect; an unsatisfiable one gets 416 with `Content-Range: bytes */N`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    length: int

    def content_range(self, total: int) -> str:
        return f"bytes {self.start}-{self.start + self.length - 1}/{total}"


class Unsatisfiable(Exception):
    """The range lies outside the representation: answer 416."""


_HUGE = 10**19  # beyond any file; also keeps int() away from very long digit strings


def _digits(text: str) -> bool:
    # str.isdigit() also accepts "²" and other digits int() refuses
    return text.isascii() and text.isdigit()


def _number(digits: str) -> int:
    return _HUGE if len(digits) > 19 else int(digits)


def parse_range(header: str | None, total: int) -> ByteRange | None:
    """None means: send the whole thing (no header, a malformed one, or several ranges)."""
    if header is None:
        return None
    unit, sep, spec = header.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not (_digits(first) or first == "") or not (_digits(last) or last == ""):
        return None
    if first == "":
        if last == "":
            return None
        suffix = _number(last)
        if suffix == 0 or total == 0:
            raise Unsatisfiable
        suffix = min(suffix, total)
        return ByteRange(total - suffix, suffix)
    start = _number(first)
    if start >= total:
        raise Unsatisfiable
    end = total - 1 if last == "" else min(_number(last), total - 1)
    if end < start:
        return None  # syntactically invalid: ignore the header, as the RFC says
    return ByteRange(start, end - start + 1)
