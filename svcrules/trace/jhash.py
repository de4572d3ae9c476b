"""The kernel's ``jhash`` as nft's hash expression uses it (net/netfilter/nft_hash.c).

``jhash ... mod M seed S offset B`` hashes the registers its expression loads: each
field in network byte order, padded with zeros to a multiple of four bytes (an IPv4
address: 4, an IPv6 address: 16, a port: 2 + 2), with Bob Jenkins' lookup3 as
include/linux/jhash.h has it, then scales the hash to ``M`` without a division
(``reciprocal_scale``) and adds ``B``. The words are read in the machine's byte order:
this is the little-endian machines' answer (x86, arm64), which tests/kernel checks
against a real kernel.
"""

from __future__ import annotations

MASK = 0xFFFFFFFF
INITVAL = 0xDEADBEEF


def _rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & MASK


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - c) & MASK
    a ^= _rol(c, 4)
    c = (c + b) & MASK
    b = (b - a) & MASK
    b ^= _rol(a, 6)
    a = (a + c) & MASK
    c = (c - b) & MASK
    c ^= _rol(b, 8)
    b = (b + a) & MASK
    a = (a - c) & MASK
    a ^= _rol(c, 16)
    c = (c + b) & MASK
    b = (b - a) & MASK
    b ^= _rol(a, 19)
    a = (a + c) & MASK
    c = (c - b) & MASK
    c ^= _rol(b, 4)
    b = (b + a) & MASK
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    c ^= b
    c = (c - _rol(b, 14)) & MASK
    a ^= c
    a = (a - _rol(c, 11)) & MASK
    b ^= a
    b = (b - _rol(a, 25)) & MASK
    c ^= b
    c = (c - _rol(b, 16)) & MASK
    a ^= c
    a = (a - _rol(c, 4)) & MASK
    b ^= a
    b = (b - _rol(a, 14)) & MASK
    c ^= b
    c = (c - _rol(b, 24)) & MASK
    return c


def jhash(data: bytes, seed: int) -> int:
    """jhash(key, length, initval) of include/linux/jhash.h, on a little-endian machine."""
    length = len(data)
    a = b = c = (INITVAL + length + seed) & MASK
    k = 0
    while length > 12:
        a = (a + int.from_bytes(data[k : k + 4], "little")) & MASK
        b = (b + int.from_bytes(data[k + 4 : k + 8], "little")) & MASK
        c = (c + int.from_bytes(data[k + 8 : k + 12], "little")) & MASK
        a, b, c = _mix(a, b, c)
        length -= 12
        k += 12
    if length == 0:
        return c
    tail = data[k:] + bytes(12 - length)  # the switch's fall-through adds only these bytes
    a = (a + int.from_bytes(tail[0:4], "little")) & MASK
    b = (b + int.from_bytes(tail[4:8], "little")) & MASK
    c = (c + int.from_bytes(tail[8:12], "little")) & MASK
    return _final(a, b, c)


def jhash_slot(data: bytes, seed: int, modulus: int) -> int:
    """The slot (0 .. modulus-1) nft's jhash gives ``data``, before its offset:
    reciprocal_scale(jhash(data, len, seed), modulus)."""
    return (jhash(data, seed) * modulus) >> 32
