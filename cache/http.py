"""Transport-neutral requests and responses: the route handlers speak only these.

Both transports (our HTTP/1.1 server with `sendfile`, and hypercorn's HTTP/2 through ASGI) turn
a `Response` into bytes on the wire. Headers are validated and complete before the first byte is
sent, so a response either arrives whole or the connection is cut (never a 200 with a short body).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote_to_bytes

from .nar import Segment


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    raw_path: str  # percent-encoded, without the query
    query: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    client: str = ""

    @property
    def path_bytes(self) -> bytes:
        return unquote_to_bytes(self.raw_path)

    def query_params(self) -> dict[str, list[str]]:
        return parse_qs(self.query, keep_blank_values=True)

    def query_value(self, name: str) -> str | None:
        values = self.query_params().get(name)
        return values[0] if values else None

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def accepts_encoding(self, coding: str) -> bool:
        """True when Accept-Encoding lists `coding` with a non-zero q-value."""
        value = self.headers.get("accept-encoding")
        if not value:
            return False
        for item in value.split(","):
            name, _, params = item.strip().partition(";")
            if name.strip().lower() != coding:
                continue
            q = params.strip().lower()
            if q.startswith("q="):
                try:
                    return float(q[2:]) > 0
                except ValueError:
                    return False
            return True
        return False


@dataclass(frozen=True, slots=True)
class SegmentsBody:
    """A body of known length made of bytes and file regions (sendfile-able)."""

    segments: Callable[[], Iterator[Segment]]
    length: int


@dataclass(frozen=True, slots=True)
class StreamBody:
    """A body produced asynchronously; `length` None means chunked (HTTP/1.1) or unframed (h2)."""

    chunks: Callable[[], AsyncIterator[bytes]]
    length: int | None


Body = bytes | SegmentsBody | StreamBody


@dataclass(slots=True)
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: Body = b""
    # set by the router for metrics/logs: which route answered
    route: str = "other"

    @property
    def content_length(self) -> int | None:
        if isinstance(self.body, bytes):
            return len(self.body)
        return self.body.length

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None


def text(
    status: int,
    body: str,
    content_type: str = "text/plain; charset=utf-8",
    extra: list[tuple[str, str]] | None = None,
) -> Response:
    return Response(status, [("Content-Type", content_type), *(extra or [])], body.encode())


def error(status: int, message: str, extra: list[tuple[str, str]] | None = None) -> Response:
    """A short plain-text error; negative answers must not be cached by clients or gateways."""
    return text(status, message.rstrip("\n") + "\n", extra=[("Cache-Control", "no-store"), *(extra or [])])
