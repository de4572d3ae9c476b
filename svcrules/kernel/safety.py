"""Guards for unattended runs: a large removal needs a human's say-so.

A source that fails in a way svcrules cannot see (a kubectl that prints half a list,
a directory that was emptied by a bad deploy) looks like "these Services went away".
Removing most of a node's Services in one run is rare enough in a healthy cluster
that svcrules refuses it unless told otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from svcrules.errors import OnInvalid, RemovalRefused
from svcrules.kernel.state import Meta

DEFAULT_MAX_REMOVALS = 50.0  # percent of the programmed Service ports


@dataclass(frozen=True)
class Policy:
    """What an unattended run may do: remove how much, accept an empty input, skip
    invalid objects. Set by apply and sync from their flags."""

    max_removals: float = DEFAULT_MAX_REMOVALS  # percent; 100 allows any share
    force: bool = False  # no removal limit at all
    allow_empty: bool = False  # an input without Services is meant (removes everything)
    on_invalid: OnInvalid = "fail"  # or "skip": leave out invalid objects, program the rest


def check_removals(old: Meta, new: Meta, policy: Policy) -> None:
    """Raise RemovalRefused when ``new`` drops too many of ``old``'s Service ports."""
    if policy.force or not old.ports:
        return
    before = len(old.ports)
    removed = sum(1 for k in old.ports if k not in new.ports)
    if not removed:
        return
    share = 100.0 * removed / before
    hint = "pass --force (or --max-removals PERCENT) if this is intended"
    if removed == before and not new.ports:
        if policy.allow_empty:
            return
        raise RemovalRefused(
            f"refusing to remove all {before} programmed Service ports (the inputs hold "
            f"none of them); check the source of the inputs, or {hint}"
        )
    if share > policy.max_removals:
        raise RemovalRefused(
            f"refusing to remove {removed} of {before} programmed Service ports "
            f"({share:.0f} %, more than --max-removals {policy.max_removals:g} %); "
            f"check the source of the inputs, or {hint}"
        )
