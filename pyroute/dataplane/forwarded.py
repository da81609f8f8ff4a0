"""Who may set X-Forwarded-For / X-Forwarded-Proto, and the client address pyroute acts on.

DFP (HAProxy's `option forwardfor` and `add-header X-Forwarded-Proto https if { ssl_fc }`)
appends the peer to X-Forwarded-For and passes a plain-HTTP client's X-Forwarded-Proto on;
its allowedIPs and logs use the TCP peer. pyroute does the same while TRUSTED_PROXIES is
empty. With TRUSTED_PROXIES (CIDRs) set, only peers inside it may set those headers (from
any other peer they are replaced), and for a trusted peer the client address is the
rightmost X-Forwarded-For address outside TRUSTED_PROXIES: the address a load balancer in
front saw, not one a client wrote into the header itself.

The result is one value per request, ``Exchange.client_ip``: IP lists, ``%[src]``, the
access log and every later consumer read it. ``ClientConnection.peer_trusted`` says whether
the connection's peer is one of TRUSTED_PROXIES (False whenever the setting is empty).
"""

from __future__ import annotations

import ipaddress

_XFF = b"x-forwarded-for"


def parse_address(text: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as peers and X-Forwarded-For write it ("1.2.3.4", "::1", "1.2.3.4:5678",
    "[::1]:5678", IPv4-mapped IPv6 as IPv4), or None."""
    text = text.strip()
    try:
        if text.startswith(b"["):
            text = text[1 : text.index(b"]")]
        elif text.count(b":") == 1:
            text = text.split(b":", 1)[0]
        address = ipaddress.ip_address(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_trusted(address: bytes, trusted: tuple) -> bool:
    """Is `address` inside one of the `trusted` networks?"""
    parsed = parse_address(address)
    return parsed is not None and any(parsed in network for network in trusted)


def forwarded_client(headers: list[tuple[bytes, bytes]], peer: bytes, trusted: tuple) -> bytes:
    """The client address of a request from a trusted peer: X-Forwarded-For read from the right,
    skipping addresses inside `trusted`; the first one outside is the client. If every entry is
    trusted, the leftmost; at an entry that is not an address, the trusted hop to its right."""
    entries: list[bytes] = []
    for name, value in headers:
        if name.lower() == _XFF:
            entries += (entry.strip() for entry in value.split(b","))
    client = peer
    for entry in reversed(entries):
        address = parse_address(entry)
        if address is None:
            break
        client = str(address).encode()
        if not any(address in network for network in trusted):
            break
    return client
