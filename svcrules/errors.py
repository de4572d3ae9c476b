"""Every error svcrules raises on purpose, in one place.

Every problem a user can fix is an ``InputError`` holding all the problems
found, each pointing at a file, a document and a field, so that one run
reports everything at once. The rest say what stopped a run on a node::

    SvcrulesError                 shown as one line, exit code 2
        InputError                the objects or the NodeConfig
        UsageError                the command line
        NotPermitted              no CAP_NET_ADMIN
        KernelError               the kernel or its tools refused (nothing applied)
        StateError                the state directory cannot be used
        LockError                 the lock file cannot be opened
            LockBusy              another run holds it (--no-wait: not a failure)
            LockTimeout           another run held it too long
        MetricsError              the metrics file cannot be written
        ListenError               serve cannot listen on its /healthz address
        RemovalRefused            a safety limit

    NeedsFullReplacement          not a failure: a change only a full replacement can make
        JumpsChanged              (iptables) the jumps from built-in chains changed
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Origin:
    """Where an object was read: file (or ``<stdin>``), document and list item."""

    path: str
    document: int
    item: int | None = None
    kind: str = ""
    ref: str = ""

    def __str__(self) -> str:
        where = f"{self.path}: document {self.document}"
        if self.item is not None:
            where += f" items[{self.item}]"
        label = " ".join(p for p in (self.kind, self.ref) if p)
        return f"{where} ({label})" if label else where


@dataclass(frozen=True)
class Problem:
    origin: Origin | None
    field: str
    message: str

    def __str__(self) -> str:
        parts = [str(self.origin)] if self.origin else []
        if self.field:
            parts.append(self.field)
        parts.append(self.message)
        return ": ".join(parts)


class SvcrulesError(Exception):
    """Base of every error svcrules raises on purpose."""


class InputError(SvcrulesError):
    """The input cannot be programmed; ``problems`` lists every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# What compiling does with an invalid Service or EndpointSlice, or with Services whose
# frontends conflict: "fail" the whole run (the default), or "skip" those objects,
# report them (``Ruleset.skipped``) and compile the rest.
OnInvalid = Literal["fail", "skip"]


class UsageError(SvcrulesError):
    """The command line is incomplete."""


class NotPermitted(SvcrulesError):
    """The process lacks CAP_NET_ADMIN."""


class KernelError(SvcrulesError):
    """The kernel (or its tools) refused a command. For nft, the message is trimmed to
    its first error (a refused transaction of thousands of elements makes nft print an
    error per element); ``details`` keeps all of it."""

    details: str = ""


class StateError(SvcrulesError):
    """The state directory cannot be used (not a directory, not writable, disk full)."""


class LockError(SvcrulesError):
    """The lock file cannot be opened."""


class LockBusy(LockError):
    """Another run holds the lock and we were told not to wait: not a failure."""


class LockTimeout(LockError):
    """Another run held the lock for longer than we were willing to wait."""


class MetricsError(SvcrulesError):
    """The metrics file cannot be written."""


class ListenError(SvcrulesError):
    """``svcrules serve`` cannot listen on the address it must answer on."""


class RemovalRefused(SvcrulesError):
    """The run would remove more Service ports than allowed."""


class NeedsFullReplacement(Exception):
    """The change is not expressible incrementally (layout or table settings changed,
    an object lingers): the reconciler replaces everything svcrules owns instead."""


class JumpsChanged(NeedsFullReplacement):
    """The jumps in built-in chains differ: only a full replacement may change them."""
