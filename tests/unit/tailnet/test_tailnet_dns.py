"""The DNS responder's codec and lookup (pure), checked against hand-built wire bytes."""

from __future__ import annotations

import struct

import pytest

from tests.tailnet import dns

DOMAIN = "tail1234.ts.net"


def query_bytes(
    name: str, qtype: int, *, query_id: int = 0x1234, flags: int = 0x0100, extra: bytes = b""
) -> bytes:
    header = struct.pack("!HHHHHH", query_id, flags, 1, 0, 0, 1 if extra else 0)
    return header + dns.encode_name(name) + struct.pack("!HH", qtype, dns.CLASS_IN) + extra


# an EDNS OPT record in the additional section, as Go's and miekg/dns's resolvers send
OPT = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)


def parse_response(data: bytes) -> tuple[int, int, int, list[tuple[int, bytes]]]:
    """(id, flags, question count, [(type, rdata)]) — a small independent reader."""
    query_id, flags, qd, an, _ns, _ar = struct.unpack_from("!HHHHHH", data)
    offset = 12
    for _ in range(qd):
        while data[offset]:
            offset += data[offset] + 1
        offset += 1 + 4
    answers = []
    for _ in range(an):
        assert data[offset : offset + 2] == b"\xc0\x0c"  # the question's name
        rtype, rclass, _ttl, length = struct.unpack_from("!HHIH", data, offset + 2)
        assert rclass == dns.CLASS_IN
        offset += 12
        answers.append((rtype, data[offset : offset + length]))
        offset += length
    assert offset == len(data)
    return query_id, flags, qd, answers


def test_a_query_parses_and_keeps_its_question() -> None:
    data = query_bytes("_acme-challenge.Harmonia.tail1234.ts.net", dns.TYPE_TXT, extra=OPT)
    q = dns.parse_query(data)
    assert (q.id, q.name, q.qtype, q.qclass) == (0x1234, "_acme-challenge.Harmonia.tail1234.ts.net", 16, 1)
    assert q.question == data[12 : len(data) - len(OPT)]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00\x01", "shorter than a DNS header"),
        (struct.pack("!HHHHHH", 7, 0x8000, 1, 0, 0, 0) + b"\x00\x00\x01\x00\x01", "a response"),
        (struct.pack("!HHHHHH", 7, 0, 2, 0, 0, 0), "2 questions"),
        (struct.pack("!HHHHHH", 7, 0, 1, 0, 0, 0) + b"\x05ab", "truncated label"),
        (struct.pack("!HHHHHH", 7, 0, 1, 0, 0, 0) + b"\xc0\x0c\x00\x10\x00\x01", "compressed"),
        (struct.pack("!HHHHHH", 7, 0, 1, 0, 0, 0) + b"\x01a\x00\x00", "truncated question"),
        (struct.pack("!HHHHHH", 7, 0, 1, 0, 0, 0) + (b"\x3f" + b"a" * 63) * 5 + b"\x00", "255 bytes"),
    ],
)
def test_unreadable_queries_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(dns.DnsFormatError, match=reason):
        dns.parse_query(data)


def test_a_garbled_query_with_an_id_gets_formerr_and_a_runt_gets_nothing() -> None:
    garbled = struct.pack("!HHHHHH", 0xBEEF, 0, 2, 0, 0, 0)
    reply = dns.respond(garbled, lambda q: (dns.RCODE_OK, []))
    assert reply is not None
    query_id, flags, qd, answers = parse_response(reply)
    assert (query_id, flags & 0x800F, qd, answers) == (0xBEEF, 0x8000 | dns.RCODE_FORMERR, 0, [])
    assert dns.respond(b"\x01", lambda q: (dns.RCODE_OK, [])) is None


TXT = {"_acme-challenge.harmonia.tail1234.ts.net": ["a" * 43, "b" * 300]}
HOSTS = {"harmonia.tail1234.ts.net": ["100.64.0.1", "fd7a:115c:a1e0::1"]}


def ask(name: str, qtype: int) -> tuple[int, list[tuple[int, bytes]]]:
    reply = dns.respond(
        query_bytes(name, qtype), lambda q: dns.answer(q, domain=DOMAIN, txt=TXT, hosts=HOSTS)
    )
    assert reply is not None
    query_id, flags, qd, answers = parse_response(reply)
    assert query_id == 0x1234 and qd == 1
    assert flags & dns.FLAG_QR and flags & dns.FLAG_AA and flags & dns.FLAG_RD  # RD echoed
    return flags & 0xF, answers


def test_txt_records_are_answered_from_what_set_dns_stored() -> None:
    rcode, answers = ask("_ACME-challenge.harmonia.tail1234.ts.net.", dns.TYPE_TXT)
    assert rcode == dns.RCODE_OK
    assert answers[0] == (dns.TYPE_TXT, b"\x2b" + b"a" * 43)
    # a value over 255 bytes is split into character strings
    assert answers[1] == (dns.TYPE_TXT, b"\xff" + b"b" * 255 + b"\x2d" + b"b" * 45)


def test_node_names_have_addresses_and_everything_else_is_nxdomain_or_refused() -> None:
    assert ask("harmonia.tail1234.ts.net", dns.TYPE_A) == (0, [(dns.TYPE_A, bytes([100, 64, 0, 1]))])
    rcode, answers = ask("harmonia.tail1234.ts.net", dns.TYPE_AAAA)
    assert rcode == 0 and answers[0][0] == dns.TYPE_AAAA and len(answers[0][1]) == 16
    assert ask("harmonia.tail1234.ts.net", dns.TYPE_TXT) == (dns.RCODE_OK, [])  # no such type: empty
    assert ask("_acme-challenge.harmonia.tail1234.ts.net", dns.TYPE_A) == (dns.RCODE_OK, [])
    assert ask("_acme-challenge.other.tail1234.ts.net", dns.TYPE_TXT) == (dns.RCODE_NXDOMAIN, [])
    assert ask("other.tail1234.ts.net", dns.TYPE_A) == (dns.RCODE_NXDOMAIN, [])
    assert ask("tail1234.ts.net", dns.TYPE_A) == (dns.RCODE_OK, [])
    assert ask("example.com", dns.TYPE_A) == (dns.RCODE_REFUSED, [])
    assert ask("eviltail1234.ts.net", dns.TYPE_A) == (dns.RCODE_REFUSED, [])


def test_other_opcodes_are_not_implemented() -> None:
    reply = dns.respond(query_bytes("harmonia.tail1234.ts.net", dns.TYPE_A, flags=0x2800), lambda q: (0, []))
    assert reply is not None
    assert parse_response(reply)[1] & 0xF == dns.RCODE_NOTIMP


def test_names_encode_as_labels_and_overlong_labels_are_refused() -> None:
    assert dns.encode_name("a.bc.") == b"\x01a\x02bc\x00"
    with pytest.raises(ValueError, match="63 bytes"):
        dns.encode_name("x" * 64 + ".ts.net")
