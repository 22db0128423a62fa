"""HTTP/1.1 message heads, parsed and written. Pure: bytes in, values out; no sockets.

Why not h11: on this cache's hot path (a ~500-byte narinfo answer) h11's per-event state
machine and header validation cost more than the route itself (see docs/benchmarks.md). This
module does the subset a binary cache needs, strictly: request heads, chunked request bodies
(`ChunkedDecoder`), response heads written from headers we build ourselves.

Rules (RFC 9112):
- a request head is the request line and header fields up to an empty line, at most
  MAX_HEAD_BYTES; lines end in CRLF (a bare LF is tolerated, as most servers do);
- request line: `METHOD SP request-target SP HTTP/1.x`; methods are tokens; the target has no
  spaces or control characters;
- header fields: `token ":" OWS value OWS`; obsolete line folding, a space before the colon,
  and control characters in values are errors; HTTP/1.1 requires exactly one Host;
- request target: origin form (`/path?query`); the absolute form (`http://host/path`) is
  accepted and reduced to its path and query, as a server must (§3.2.2);
- framing: Transfer-Encoding wins over Content-Length; several differing Content-Length values
  or a non-numeric one are errors; a chunked body's size lines and trailers are bounded;
- persistence: HTTP/1.1 keeps the connection unless `Connection: close`; HTTP/1.0 only with
  `Connection: keep-alive`.
Errors are the client's (`BadRequest`, with the status to answer: 400, 431 or 501).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HEAD_BYTES = 32 * 1024
MAX_HEADERS = 100

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e\x80-\xff]+) HTTP/1\.([01])")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class BadRequest(Exception):
    """The client sent something that is not HTTP/1.1 as we accept it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    target: str
    minor: int  # HTTP/1.<minor>
    headers: dict[str, str]  # lower-case names; repeats joined with ", "
    keep_alive: bool  # persistent without reading a body (False when one follows)
    has_body: bool
    persistent: bool = True  # what the client asked for, body or not
    body_length: int | None = 0  # Content-Length; None when chunked or another coding
    chunked: bool = False
    expects_continue: bool = False


_ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*")


def origin_form(target: str) -> str:
    """`http://host/p?q` → `/p?q` (RFC 9112 §3.2.2); other targets are returned unchanged."""
    match = _ABSOLUTE.match(target)
    if match is None:
        return target
    rest = target[match.end() :]
    return rest if rest.startswith("/") else "/" + rest


def find_head_end(buf: bytes | bytearray, start: int = 0) -> int:
    """Index just past the empty line ending a head, or -1 when more bytes are needed."""
    crlf = buf.find(b"\r\n\r\n", start)
    lf = buf.find(b"\n\n", start)
    if crlf == -1 and lf == -1:
        return -1
    if lf == -1 or (crlf != -1 and crlf + 1 < lf):
        return crlf + 4
    return lf + 2


# A client sends the same header lines with every request (Host, User-Agent, Accept...): each
# distinct line is checked once, then looked up. Only valid lines are remembered.
FIELD_MEMO_ENTRIES = 4096
FIELD_MEMO_LINE = 512
_FIELDS: dict[bytes, tuple[str, str]] = {}


def _parse_field(line: bytes) -> tuple[str, str]:
    """One header line: its lower-case name and its value, or BadRequest."""
    if line[:1] in (b" ", b"\t"):
        raise BadRequest(400, "obsolete line folding is not accepted")
    name, sep, value = line.partition(b":")
    if not sep or _TOKEN.fullmatch(name) is None:
        raise BadRequest(400, "malformed header field")
    value = value.strip(b" \t")
    if _BAD_VALUE.search(value):
        raise BadRequest(400, "control character in a header value")
    return name.decode("ascii").lower(), value.decode("latin-1")


def parse_head(raw: bytes) -> RequestHead:
    lines = raw.split(b"\n")
    # drop the terminating empty line(s) and the CRs
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    while lines and lines[-1] == b"":
        lines.pop()
    # RFC 9112 §2.2: ignore at least one empty line before the request line
    while lines and lines[0] == b"":
        lines.pop(0)
    if not lines:
        raise BadRequest(400, "empty request")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        if lines[0].count(b" ") == 2 and lines[0].rsplit(b" ", 1)[1].startswith(b"HTTP/"):
            raise BadRequest(400, "only HTTP/1.0 and HTTP/1.1 are spoken here")
        raise BadRequest(400, "malformed request line")
    method = match.group(1).decode("ascii")
    target = match.group(2).decode("latin-1")
    minor = int(match.group(3))
    if len(lines) - 1 > MAX_HEADERS:
        raise BadRequest(431, "too many header fields")
    headers: dict[str, str] = {}
    lengths: set[str] = set()
    hosts = 0
    seen = _FIELDS
    for line in lines[1:]:
        field = seen.get(line)
        if field is None:
            field = _parse_field(line)
            if len(line) <= FIELD_MEMO_LINE:
                if len(seen) >= FIELD_MEMO_ENTRIES:
                    seen.clear()
                seen[line] = field
        key, text = field
        if key == "content-length":
            lengths.update(part.strip() for part in text.split(","))
        elif key == "host":
            hosts += 1
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    if minor == 1 and hosts != 1:
        raise BadRequest(400, "an HTTP/1.1 request needs exactly one Host header")
    has_body = False
    body_length: int | None = 0
    chunked = False
    if "transfer-encoding" in headers:
        if minor == 0:
            raise BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")
        has_body = True
        body_length = None
        codings = [c.strip().lower() for c in headers["transfer-encoding"].split(",")]
        chunked = codings == ["chunked"]  # anything else cannot be framed by us: read fails, close
    elif lengths:
        length = next(iter(lengths))
        if len(lengths) != 1 or not (length.isascii() and length.isdigit()) or len(length) > 18:
            raise BadRequest(400, "invalid Content-Length")
        body_length = int(length)
        has_body = body_length > 0
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "close" not in tokens if minor == 1 else "keep-alive" in tokens
    expects_continue = minor == 1 and has_body and headers.get("expect", "").lower() == "100-continue"
    return RequestHead(
        method,
        target,
        minor,
        headers,
        keep_alive and not has_body,
        has_body,
        keep_alive,
        body_length,
        chunked,
        expects_continue,
    )


MAX_CHUNK_LINE = 4096
MAX_TRAILERS = MAX_HEAD_BYTES


class ChunkedDecoder:
    """A chunked request body (RFC 9112 §7.1), decoded from a buffer it consumes. Sans-IO.

    `decode(buf, max_bytes)` returns body bytes, b"" once the last chunk and the trailers are
    read, or None when `buf` needs more input. Malformed framing raises `BadRequest`.
    """

    def __init__(self) -> None:
        self._left = 0  # bytes of the current chunk still to come
        self._state = "size"  # size | data | data-end | trailers | done
        self._trailer_bytes = 0

    @property
    def done(self) -> bool:
        return self._state == "done"

    def decode(self, buf: bytearray, max_bytes: int) -> bytes | None:
        while True:
            if self._state == "done":
                return b""
            if self._state == "data":
                if not buf:
                    return None
                n = min(self._left, max_bytes, len(buf))
                out = bytes(buf[:n])
                del buf[:n]
                self._left -= n
                if not self._left:
                    self._state = "data-end"
                return out
            end = buf.find(b"\n")
            if end == -1:
                limit = MAX_CHUNK_LINE if self._state != "trailers" else MAX_TRAILERS
                if len(buf) > limit:
                    raise BadRequest(400, "chunked body: line too long")
                return None
            line = bytes(buf[:end]).rstrip(b"\r")
            del buf[: end + 1]
            if self._state == "data-end":
                if line:
                    raise BadRequest(400, "chunked body: data longer than its chunk size")
                self._state = "size"
            elif self._state == "size":
                size = line.split(b";", 1)[0].strip()
                if not size or len(size) > 15 or not all(c in b"0123456789abcdefABCDEF" for c in size):
                    raise BadRequest(400, "chunked body: invalid chunk size")
                self._left = int(size, 16)
                self._state = "data" if self._left else "trailers"
            else:  # trailers, dropped
                self._trailer_bytes += len(line) + 2
                if self._trailer_bytes > MAX_TRAILERS:
                    raise BadRequest(431, "chunked body: trailers too large")
                if not line:
                    self._state = "done"


_REASONS: dict[int, bytes] = {}


def _reason(status: int) -> bytes:
    found = _REASONS.get(status)
    if found is None:
        import http

        try:
            found = http.HTTPStatus(status).phrase.encode()
        except ValueError:
            found = b""
        _REASONS[status] = found
    return found


_HEADER_LINES: dict[tuple[str, str], bytes] = {}
_HEADER_LINES_MAX = 4096


def _header_line(name: str, value: str) -> bytes:
    raw_value = value.encode("latin-1")
    if b"\r" in raw_value or b"\n" in raw_value or _TOKEN.fullmatch(name.encode("ascii")) is None:
        raise ValueError(f"refusing to write an unsafe header {name!r}")
    return b"%s: %s\r\n" % (name.encode("ascii"), raw_value)


def write_head(status: int, headers: list[tuple[str, str]], *, close: bool) -> bytes:
    """A response head. Header names and values are ours; a CR or LF in one is a bug, refused."""
    out = [b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))]
    for header in headers:
        line = _HEADER_LINES.get(header)
        if line is None:
            line = _header_line(*header)
            if len(_HEADER_LINES) >= _HEADER_LINES_MAX:  # Date and lengths keep changing
                _HEADER_LINES.clear()
            _HEADER_LINES[header] = line  # most answers repeat the same few headers
        out.append(line)
    if close:
        out.append(b"Connection: close\r\n")
    out.append(b"\r\n")
    return b"".join(out)
