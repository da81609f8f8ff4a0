"""PROXY protocol v1/v2 headers (HAProxy's spec), as sent by a load balancer in front.

A balancer (an L4 cloud balancer, another HAProxy) prepends one header naming the real
client. acceptor.py peeks it on listeners marked ``accept-proxy``; this module only
parses it.
"""

from __future__ import annotations

import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107
PEEK = 536  # v1's maximum, and v2 headers with typical TLVs


class BadHeader(ValueError):
    pass


def parse_header(data: bytes) -> tuple[int, str | None] | None:
    """(header length, client IP or None for LOCAL/UNKNOWN) for a header at the start of
    `data`; None while more bytes are needed; BadHeader if it is not a valid header."""
    if data[:12] == V2_SIGNATURE[: len(data[:12])] and len(data) < 16:
        return None
    if data.startswith(V2_SIGNATURE):
        ver_cmd, family, length = data[12], data[13], struct.unpack_from("!H", data, 14)[0]
        if ver_cmd >> 4 != 2 or ver_cmd & 0xF > 1:
            raise BadHeader("PROXY v2: unknown version or command")
        total = 16 + length
        if len(data) < total:
            return None
        if ver_cmd & 0xF == 0:  # LOCAL: the balancer's own connection (health checks)
            return total, None
        if family >> 4 == 1 and length >= 12:
            return total, str(ipaddress.IPv4Address(data[16:20]))
        if family >> 4 == 2 and length >= 36:
            return total, str(ipaddress.IPv6Address(data[16:32]))
        return total, None  # AF_UNSPEC / AF_UNIX: no usable address
    if data.startswith(b"PROXY "[: len(data)]) and len(data) < 6:
        return None
    if data.startswith(b"PROXY "):
        end = data.find(b"\r\n", 0, V1_MAX + 1)
        if end < 0:
            if len(data) >= V1_MAX:
                raise BadHeader("PROXY v1: no CRLF within 107 bytes")
            return None
        words = data[:end].split(b" ")
        if len(words) >= 2 and words[1] == b"UNKNOWN":
            return end + 2, None
        if len(words) != 6 or words[1] not in (b"TCP4", b"TCP6"):
            raise BadHeader("PROXY v1: malformed header")
        try:
            ip = ipaddress.ip_address(words[2].decode("ascii"))
            int(words[4]), int(words[5])
        except ValueError:
            raise BadHeader("PROXY v1: malformed address") from None
        if (ip.version == 4) != (words[1] == b"TCP4"):
            raise BadHeader("PROXY v1: address does not match the family")
        return end + 2, str(ip)
    raise BadHeader("no PROXY protocol header")
