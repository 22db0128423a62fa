"""A STUN binding responder (RFC 5389, the part netcheck uses), so nodes finish netcheck at once.

Without STUN on the DERP node (``STUNPort: -1``) the Go node waits ~3 s for UDP, then probes
captive portals on tailscale.com for ~3 s more before it goes to ``Running``.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct

import trio

log = logging.getLogger("tailnet.stun")

MAGIC_COOKIE = 0x2112A442
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
ATTR_XOR_MAPPED_ADDRESS = 0x0020
HEADER_LEN = 20


class StunError(ValueError):
    pass


def parse_binding_request(packet: bytes) -> bytes:
    """The transaction ID of a binding request; raises :class:`StunError` otherwise."""
    if len(packet) < HEADER_LEN:
        raise StunError("shorter than a STUN header")
    msg_type, length, cookie = struct.unpack(">HHI", packet[:8])
    if msg_type != BINDING_REQUEST or cookie != MAGIC_COOKIE:
        raise StunError("not a STUN binding request")
    if length != len(packet) - HEADER_LEN or length % 4:
        raise StunError("STUN length field does not match the packet")
    return packet[8:20]


def binding_response(txid: bytes, host: str, port: int) -> bytes:
    addr = ipaddress.ip_address(host)
    xport = port ^ (MAGIC_COOKIE >> 16)
    if addr.version == 4:
        xaddr = bytes(a ^ b for a, b in zip(addr.packed, struct.pack(">I", MAGIC_COOKIE), strict=True))
        family = 0x01
    else:
        mask = struct.pack(">I", MAGIC_COOKIE) + txid
        xaddr = bytes(a ^ b for a, b in zip(addr.packed, mask, strict=True))
        family = 0x02
    value = struct.pack(">BBH", 0, family, xport) + xaddr
    attr = struct.pack(">HH", ATTR_XOR_MAPPED_ADDRESS, len(value)) + value
    return struct.pack(">HHI", BINDING_SUCCESS, len(attr), MAGIC_COOKIE) + txid + attr


async def bind_stun(host: str, port: int = 0) -> trio.socket.SocketType:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    await sock.bind((host, port))
    return sock


async def serve_stun(sock: trio.socket.SocketType) -> None:
    with sock:
        while True:
            packet, peer = await sock.recvfrom(2048)
            try:
                txid = parse_binding_request(packet)
            except StunError as exc:
                log.debug("stun: ignoring packet from %s: %s", peer, exc)
                continue
            try:
                await sock.sendto(binding_response(txid, peer[0], peer[1]), peer)
            except OSError as exc:
                log.debug("stun: cannot answer %s: %s", peer, exc)
