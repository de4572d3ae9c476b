"""IP address and CIDR parsing with Kubernetes' tolerance.

The Kubernetes API still holds addresses written with leading zeros
(``172.30.0.041``) from before validation tightened; Python's ``ipaddress``
refuses them, so IPv4 octets are normalised here first, as the API server's
legacy parser does (decimal, leading zeros ignored).
"""

from __future__ import annotations

import ipaddress
import socket
from functools import lru_cache
from typing import Literal

Family = Literal[4, 6]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _strip_octet_zeros(text: str) -> str:
    if ":" in text:
        return text
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        return text
    return ".".join(str(int(p)) for p in parts)


def parse_ip(text: str) -> IPAddress:
    """Parse an address, accepting legacy leading zeros; raise ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"expected an IP address string, got {text!r}")
    cleaned = text.strip()
    if "%" in cleaned:
        raise ValueError(f"{text!r}: a zone index (%...) is not allowed here")
    try:
        return ipaddress.ip_address(_strip_octet_zeros(cleaned))
    except ValueError:
        raise ValueError(f"{text!r} is not a valid IP address") from None


def parse_cidr(text: str) -> IPNetwork:
    """Parse a CIDR; host bits set is an error, as the API server would say."""
    if not isinstance(text, str):
        raise ValueError(f"expected a CIDR string, got {text!r}")
    cleaned = text.strip()
    if "/" not in cleaned:
        raise ValueError(f"{text!r} is not a CIDR (missing /prefix)")
    addr, _, prefix = cleaned.partition("/")
    if "%" in addr:
        raise ValueError(f"{text!r}: a zone index (%...) is not allowed here")
    try:
        return ipaddress.ip_network(f"{_strip_octet_zeros(addr)}/{prefix}", strict=True)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a valid CIDR: {exc}") from None


@lru_cache(maxsize=1 << 21)
def canonical_ip(text: str) -> str:
    """Canonical spelling; IPv4 in the usual form takes a fast path (large inputs
    hold hundreds of thousands of endpoint addresses)."""
    if isinstance(text, str) and "." in text and ":" not in text:
        try:
            if socket.inet_ntoa(socket.inet_pton(socket.AF_INET, text)) == text:
                return text
        except OSError:
            pass  # leading zeros, whitespace or garbage: the careful path decides
    return str(parse_ip(text))


def canonical_cidr(text: str) -> str:
    return str(parse_cidr(text))


def family_of(text: str) -> Family:
    """Family of a canonical address or CIDR."""
    return 6 if ":" in text else 4


def packed(text: str) -> bytes:
    """Binary form of a canonical address: sorts numerically within one family, and
    costs one C call (the hot sorts handle hundreds of thousands of addresses)."""
    return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)


@lru_cache(maxsize=1 << 21)
def ip_sort_key(text: str) -> tuple[int, bytes, int]:
    """Numeric order, so that 10.0.0.9 sorts before 10.0.0.10 (canonical input)."""
    addr, _, prefix = text.partition("/")
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    packed = socket.inet_pton(fam, addr)
    return (4 if fam == socket.AF_INET else 6, packed, int(prefix) if prefix else -1)


def collapse_cidrs(cidrs: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Merge overlapping and adjacent CIDRs of one family: nft interval sets refuse
    overlapping elements, and users do write 10.0.0.0/8 next to 10.1.2.3/32."""
    return _collapse(tuple(cidrs))


@lru_cache(maxsize=4096)
def _collapse(cidrs: tuple[str, ...]) -> tuple[str, ...]:
    nets = [ipaddress.ip_network(c) for c in cidrs]
    v4 = [n for n in nets if n.version == 4]
    v6 = [n for n in nets if n.version == 6]
    merged = [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]
    return tuple(str(n) for n in merged)


@lru_cache(maxsize=4096)
def ip_in_cidr(ip: str, cidr: str) -> bool:
    return parse_ip(ip) in parse_cidr(cidr)
