"""A small DNS responder for the local tailnet: what Tailscale's public DNS does for ``*.ts.net``.

It answers ``TXT _acme-challenge.<node>.<domain>`` with the values nodes stored through
``POST /machine/set-dns`` (the ACME server looks them up for dns-01), and ``A``/``AAAA`` for the
nodes' own names. Anything else under the tailnet domain is NXDOMAIN (a known name asked for
another type: an empty answer); names outside it are REFUSED.

The message codec (:func:`parse_query`, :func:`encode_response`) and the lookup
(:func:`answer`) are pure; :func:`serve_dns` is the UDP loop.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import trio

log = logging.getLogger("tailnet.dns")

TYPE_A = 1
TYPE_TXT = 16
TYPE_AAAA = 28
CLASS_IN = 1

RCODE_OK = 0
RCODE_FORMERR = 1
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5

FLAG_QR = 0x8000
FLAG_AA = 0x0400
FLAG_RD = 0x0100
OPCODE_MASK = 0x7800

HEADER = struct.Struct("!HHHHHH")
TTL = 0  # challenge values change at every order: never let a resolver cache them
MAX_LABEL = 63
MAX_NAME = 255
MAX_CHARSTRING = 255


class DnsFormatError(ValueError):
    """The datagram is not a DNS query this responder can read."""

    def __init__(self, reason: str, query_id: int | None = None) -> None:
        super().__init__(reason)
        self.query_id = query_id


@dataclass(frozen=True)
class Query:
    id: int
    flags: int
    name: str
    """As asked (case kept, no trailing dot)."""
    qtype: int
    qclass: int
    question: bytes
    """The question section's bytes, echoed back in the response."""


@dataclass(frozen=True)
class Record:
    rtype: int
    rdata: bytes

    @staticmethod
    def txt(value: str) -> Record:
        data = value.encode()
        # a TXT record is a run of <=255-byte character strings
        chunks = [data[i : i + MAX_CHARSTRING] for i in range(0, len(data), MAX_CHARSTRING)] or [b""]
        return Record(TYPE_TXT, b"".join(bytes([len(c)]) + c for c in chunks))

    @staticmethod
    def address(text: str) -> Record:
        ip = ipaddress.ip_address(text)
        return Record(TYPE_A if ip.version == 4 else TYPE_AAAA, ip.packed)


def _read_name(data: bytes, offset: int) -> tuple[str, int]:
    labels: list[str] = []
    total = 0
    while True:
        if offset >= len(data):
            raise DnsFormatError("truncated name")
        length = data[offset]
        offset += 1
        if length == 0:
            break
        if length & 0xC0:
            raise DnsFormatError("compressed or extended label in a question")
        label = data[offset : offset + length]
        if len(label) != length:
            raise DnsFormatError("truncated label")
        total += length + 1
        if total > MAX_NAME:
            raise DnsFormatError("name longer than 255 bytes")
        try:
            labels.append(label.decode("ascii"))
        except UnicodeDecodeError:
            raise DnsFormatError("non-ASCII label") from None
        offset += length
    return ".".join(labels), offset


def parse_query(data: bytes) -> Query:
    """The first question of a DNS query; :class:`DnsFormatError` if it cannot be read."""
    if len(data) < HEADER.size:
        raise DnsFormatError("shorter than a DNS header")
    query_id, flags, qdcount, _an, _ns, _ar = HEADER.unpack_from(data)
    if flags & FLAG_QR:
        raise DnsFormatError("a response, not a query", query_id)
    if qdcount != 1:
        raise DnsFormatError(f"{qdcount} questions (exactly one is supported)", query_id)
    try:
        name, offset = _read_name(data, HEADER.size)
    except DnsFormatError as exc:
        raise DnsFormatError(str(exc), query_id) from None
    if offset + 4 > len(data):
        raise DnsFormatError("truncated question", query_id)
    qtype, qclass = struct.unpack_from("!HH", data, offset)
    return Query(query_id, flags, name, qtype, qclass, data[HEADER.size : offset + 4])


def encode_name(name: str) -> bytes:
    out = bytearray()
    for label in filter(None, name.rstrip(".").split(".")):
        raw = label.encode("ascii")
        if len(raw) > MAX_LABEL:
            raise ValueError(f"label longer than 63 bytes in {name!r}")
        out += bytes([len(raw)]) + raw
    return bytes(out) + b"\x00"


def encode_response(query: Query, rcode: int, answers: Sequence[Record] = ()) -> bytes:
    """A response to ``query`` (its question echoed; answers named by a pointer to it)."""
    opcode = query.flags & OPCODE_MASK
    flags = FLAG_QR | FLAG_AA | opcode | (query.flags & FLAG_RD) | (rcode & 0xF)
    out = bytearray(HEADER.pack(query.id, flags, 1, len(answers), 0, 0))
    out += query.question
    for record in answers:
        # 0xC00C: the question's name, right after the 12-byte header
        out += struct.pack("!HHHIH", 0xC00C, record.rtype, CLASS_IN, TTL, len(record.rdata))
        out += record.rdata
    return bytes(out)


def encode_error(query_id: int, rcode: int) -> bytes:
    """A bare error response (no question) for a datagram that could not be read."""
    return HEADER.pack(query_id, FLAG_QR | (rcode & 0xF), 0, 0, 0, 0)


CHALLENGE_PREFIX = "_acme-challenge."


def answer(
    query: Query,
    *,
    domain: str,
    txt: Mapping[str, Sequence[str]],
    hosts: Mapping[str, Sequence[str]],
) -> tuple[int, list[Record]]:
    """The rcode and records for ``query``. ``txt``: lower-case name → TXT values (what set-dns
    stored); ``hosts``: lower-case node name (``web.<domain>``) → its addresses."""
    if query.qclass != CLASS_IN:
        return RCODE_NOTIMP, []
    name = query.name.lower().rstrip(".")
    domain = domain.lower().rstrip(".")
    if name != domain and not name.endswith("." + domain):
        return RCODE_REFUSED, []
    if txt.get(name):
        if query.qtype == TYPE_TXT:
            return RCODE_OK, [Record.txt(v) for v in txt[name]]
        return RCODE_OK, []
    if name in hosts:
        wanted = {TYPE_A: 4, TYPE_AAAA: 6}.get(query.qtype)
        addresses = [a for a in hosts[name] if ipaddress.ip_address(a).version == wanted]
        return RCODE_OK, [Record.address(a) for a in addresses]
    if name == domain:
        return RCODE_OK, []
    return RCODE_NXDOMAIN, []


def respond(data: bytes, lookup: Callable[[Query], tuple[int, list[Record]]]) -> bytes | None:
    """The response datagram for ``data`` (``None``: nothing can be answered)."""
    try:
        query = parse_query(data)
    except DnsFormatError as exc:
        log.warning("unreadable DNS query: %s", exc)
        return None if exc.query_id is None else encode_error(exc.query_id, RCODE_FORMERR)
    if query.flags & OPCODE_MASK:
        return encode_response(query, RCODE_NOTIMP)
    rcode, records = lookup(query)
    log.debug("DNS %s type %d: rcode %d, %d answer(s)", query.name, query.qtype, rcode, len(records))
    return encode_response(query, rcode, records)


async def bind_dns(host: str, port: int = 0) -> trio.socket.SocketType:
    family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
    sock = trio.socket.socket(family, trio.socket.SOCK_DGRAM)
    await sock.bind((host, port))
    return sock


async def serve_dns(
    sock: trio.socket.SocketType, lookup: Callable[[Query], tuple[int, list[Record]]]
) -> None:
    """Answer DNS queries on ``sock`` (UDP) until cancelled."""
    with sock:
        while True:
            data, peer = await sock.recvfrom(4096)
            reply = respond(data, lookup)
            if reply is not None:
                try:
                    await sock.sendto(reply, peer)
                except OSError as exc:
                    log.debug("DNS reply to %s failed: %s", peer, exc)
