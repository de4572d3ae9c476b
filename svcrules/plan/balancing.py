"""How a selection of endpoints is picked from: slot tables, weighted, random or Maglev.

Every pick is a table of slots, each naming one endpoint; a new connection takes one
slot. With ``random`` the slot is drawn uniformly, so an endpoint's share is its
number of slots over the table's; with ``maglev`` the slot is a hash of the flow (or
of the client address, with ClientIP affinity), so the same flow takes the same slot
on every node that compiled the same objects. Both backends spell these tables; only
this module decides them.

Maglev's table is the published permutation fill (Eisenbud et al., "Maglev: A Fast
and Reliable Software Network Load Balancer", NSDI 2016, section 3.4): each endpoint
walks its own permutation of the slots (an offset and a skip from a hash of the
endpoint and the seed) and takes the next free slot on its turn. Weights decide the
turns: each endpoint's number of slots is its weight's share of the table (rounded by
largest remainder), and the turn goes to the endpoint furthest behind its share. An
endpoint that leaves frees only its own slots, and the others keep theirs except where
they fill in, which is why removing one of N endpoints moves about 1/N of flows.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Sequence
from math import gcd

from svcrules.inputs.model import MAGLEV_SIZES

# The longest table a weighted random pick uses: weights whose reduced sum is larger are
# rounded to this many slots (one slot block of the nft layout; 1/4096 per slot).
RANDOM_SLOTS = 4096
SLOTS_PER_ENDPOINT = 100  # Maglev's default table: at least this many slots per endpoint
# ... and at least this many slots: a table of another size is another table, and nearly
# every flow moves (83.9 % measured for 6 -> 5 endpoints, 1,021 -> 509 slots), so the
# default must not change with the endpoint counts of a rolling update. 4,093 slots hold
# 40 endpoints at 100 each.
MIN_DEFAULT_SIZE = 4093


def default_table_size(endpoints: int) -> int:
    """The smallest of Cilium's Maglev sizes from MIN_DEFAULT_SIZE up with
    SLOTS_PER_ENDPOINT slots for each of ``endpoints`` (the largest size beyond that):
    shares then within 1 % of weights, and the size changes only past 40 endpoints."""
    want = max(MIN_DEFAULT_SIZE, SLOTS_PER_ENDPOINT * endpoints)
    return next((m for m in MAGLEV_SIZES if m >= want), MAGLEV_SIZES[-1])


def apportion(weights: Sequence[int], total: int) -> list[int]:
    """``total`` slots shared in proportion to ``weights`` (Hamilton's largest remainder;
    ties to the earlier weight). A positive weight may get 0 slots when its share is
    below one slot."""
    whole = sum(weights)
    counts = [w * total // whole for w in weights]
    rest = total - sum(counts)
    order = sorted(range(len(weights)), key=lambda i: (-(weights[i] * total % whole), i))
    for i in order[:rest]:
        counts[i] += 1
    return counts


def random_slots(weights: Sequence[int]) -> tuple[int, ...]:
    """The slot table of a random pick: endpoint indices, each repeated for its weight
    (reduced by the weights' common divisor, at most RANDOM_SLOTS slots in all). Equal
    weights give one slot per endpoint, in order."""
    divisor = 0
    for w in weights:
        divisor = gcd(divisor, w)
    counts = [w // divisor for w in weights]
    if sum(counts) > RANDOM_SLOTS:
        counts = apportion(weights, RANDOM_SLOTS)
    return tuple(i for i, c in enumerate(counts) for _ in range(c))


def _permutation(name: str, seed: int, size: int) -> tuple[int, int]:
    """An endpoint's offset and skip: from a hash of its name and the seed (never
    Python's hash(), which changes from one process to the next)."""
    h = hashlib.blake2b(f"{seed:08x}|{name}".encode(), digest_size=16).digest()
    first = int.from_bytes(h[:8], "big")
    second = int.from_bytes(h[8:], "big")
    return first % size, second % (size - 1) + 1


def maglev_table(
    names: Sequence[str], weights: Sequence[int], size: int, seed: int
) -> tuple[int, ...]:
    """Maglev's lookup table of ``size`` slots (a prime) for endpoints ``names`` (unique,
    as "address,port") with positive ``weights``: slot -> index into ``names``. Depends
    only on the (name, weight) pairs, the size and the seed, not on their order."""
    if not names:
        return ()
    order = sorted(range(len(names)), key=lambda i: names[i])
    quota = apportion([weights[i] for i in order], size)
    perms = [_permutation(names[i], seed, size) for i in order]
    nexts = [0] * len(order)
    filled = [0] * len(order)
    table = [-1] * size
    # The turn goes to the endpoint furthest behind its quota: least (filled+1)/quota
    # (a float, computed alike everywhere); ties to the name first in order.
    turns = [(1 / q, k) for k, q in enumerate(quota) if q > 0]
    heapq.heapify(turns)
    while turns:
        _, k = heapq.heappop(turns)
        offset, skip = perms[k]
        j = nexts[k]
        slot = (offset + j * skip) % size
        while table[slot] >= 0:
            j += 1
            slot = (offset + j * skip) % size
        nexts[k] = j + 1
        table[slot] = order[k]
        filled[k] += 1
        if filled[k] < quota[k]:
            heapq.heappush(turns, ((filled[k] + 1) / quota[k], k))
    return tuple(table)


def shares(slots: Sequence[int], endpoints: int) -> list[float]:
    """Each endpoint's share of a slot table (what a pick gives it)."""
    counts = [0] * endpoints
    for i in slots:
        counts[i] += 1
    return [c / (len(slots) or 1) for c in counts]
