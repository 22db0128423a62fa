"""One answer to a Range header for every route that serves bytes (NARs, copies, /serve files).

`ranges.parse_range` is the pure parser; this turns its verdict into a status, the headers that
go with it, and the slice to send, or into the 416 answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..nar import Segment, slice_segments
from ..ranges import Unsatisfiable, parse_range
from ..transport.messages import Body, Request, Response, SegmentsBody, error


@dataclass(frozen=True, slots=True)
class Selected:
    """What to send: the whole representation (200) or one slice of it (206)."""

    status: int
    start: int
    length: int
    headers: tuple[tuple[str, str], ...]  # Content-Range for a 206


def select_range(request: Request, total: int) -> Selected | Response:
    """The slice a request asks for, or the 416 answer when it lies outside `total` bytes."""
    try:
        rng = parse_range(request.header("range"), total)
    except Unsatisfiable:
        return error(416, "range not satisfiable", [("Content-Range", f"bytes */{total}")])
    if rng is None:
        return Selected(200, 0, total, ())
    return Selected(206, rng.start, rng.length, (("Content-Range", rng.content_range(total)),))


def ranged(
    request: Request, headers: list[tuple[str, str]], total: int, body: Callable[[int, int], Body]
) -> Response:
    """A response of `total` bytes honouring Range; `body(start, length)` makes the slice."""
    selected = select_range(request, total)
    if isinstance(selected, Response):
        return selected
    return Response(selected.status, [*headers, *selected.headers], body(selected.start, selected.length))


def segment_slices(make: Callable[[], Iterator[Segment]], total: int) -> Callable[[int, int], Body]:
    """`ranged`'s body maker for a body made of segments (files and NAR framing)."""

    def body(start: int, length: int) -> Body:
        if start == 0 and length == total:
            return SegmentsBody(make, total)
        return SegmentsBody(lambda: slice_segments(make(), start, length), length)

    return body
