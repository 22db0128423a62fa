"""Transport-neutral requests and responses: the route handlers speak only these.

Both servers (HTTP/1.1 with `sendfile`, HTTP/2 on the h2 library) turn a `Response` into bytes
on the wire through one body writer (`delivery.py`). Headers are complete before the first byte
is sent, so a response either arrives whole or is cut (connection closed, stream reset): never a
200 with a short body.

A request body is read by the route that wants it, through `Request.body.receive()`; a route that
answers without reading it never makes the client send it (`Expect: 100-continue`), and the
transport then closes the connection (HTTP/1.1) or resets the rest of the stream (HTTP/2).
A body cut short, longer than announced or stalled raises `RequestBodyError` in `receive()`
(answered 400 if the route lets it escape); an HTTP/2 client that resets its stream cancels the
route instead (nobody is left to answer).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote_to_bytes

import trio

from ..nar import Segment

BODY_IDLE_TIMEOUT = 30.0  # a client that sends nothing of its body for this long is gone


class RequestBodyError(Exception):
    """The request body could not be read whole: cut short, longer than announced, or stalled."""


class RequestBody:
    """The body of a request, read on demand; this base class is the empty body.

    `length` is the announced size (Content-Length), None when not announced (chunked, or an
    HTTP/2 request without content-length). `receive()` returns the next bytes, b"" at the end;
    before the first read it sends `100 Continue` when the client asked for it.
    """

    def __init__(self, length: int | None = 0, *, expects_continue: bool = False) -> None:
        self.length = length
        self.expects_continue = expects_continue
        self.received = 0
        self.complete = length == 0  # the end was reached (all of it read)
        self.started = False  # a read was attempted: 100 Continue is out
        self.failed: RequestBodyError | None = None

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self.failed is not None:
            raise self.failed
        if self.complete:
            await trio.lowlevel.checkpoint()
            return b""
        try:
            if not self.started:
                self.started = True
                if self.expects_continue:
                    await self._send_continue()
            want = max_bytes if self.length is None else min(max_bytes, self.length - self.received)
            with trio.fail_after(BODY_IDLE_TIMEOUT):
                data = await self._read(max(1, want))
            if not data:
                if self.length is not None and self.received < self.length:
                    raise RequestBodyError(
                        f"the request body ended after {self.received} of {self.length} bytes"
                    )
                self.complete = True
                return b""
            self.received += len(data)
            if self.length is not None:
                if self.received > self.length:
                    raise RequestBodyError(f"the request body is longer than its {self.length} bytes")
                if self.received == self.length:
                    self.complete = True
            return data
        except trio.TooSlowError:
            self.failed = RequestBodyError(f"the client sent no body bytes for {BODY_IDLE_TIMEOUT:.0f} s")
        except RequestBodyError as exc:
            self.failed = exc
        raise self.failed

    async def _read(self, max_bytes: int) -> bytes:
        """At most `max_bytes` of the body as the transport has it; b"" at its end."""
        await trio.lowlevel.checkpoint()
        return b""

    async def _send_continue(self) -> None:
        await trio.lowlevel.checkpoint()


EMPTY_BODY = RequestBody(0)


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    raw_path: str  # percent-encoded, without the query
    query: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    client: str = ""
    body: RequestBody = EMPTY_BODY

    @property
    def path_bytes(self) -> bytes:
        return unquote_to_bytes(self.raw_path)

    def query_params(self) -> dict[str, list[str]]:
        return parse_qs(self.query, keep_blank_values=True)

    def query_value(self, name: str) -> str | None:
        query = self.query
        # the common case, `?hash=<32 letters>` on every NAR request: no parse_qs
        if query.startswith(name) and query[len(name) : len(name) + 1] == "=":
            value = query[len(name) + 1 :]
            if not any(c in value for c in "&;%+"):
                return value
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
    """A body produced asynchronously; `length` None means chunked (HTTP/1.1) or unframed (h2).

    `close`, when given, is always awaited once the response is over, sent or not: it releases
    what the route opened before answering (a generator never started cannot clean up itself).
    """

    chunks: Callable[[], AsyncIterator[bytes]]
    length: int | None
    close: Callable[[], Awaitable[None]] | None = None


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
