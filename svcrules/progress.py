"""The long phases of a run, named for whoever wants to show them.

The library marks a phase that may take seconds (reading 200 MB of inputs, planning
50,000 Services, a kernel transaction) with ``with phase("planning Services"):``.
Nothing is shown unless someone watches: the command line installs a watcher
(``svcrules.cli.progress``) that draws a spinner on a terminal and, with ``-v``,
logs how long each phase took. Without one a phase costs a function call.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Phase:
    """One phase in progress; ``detail`` says what it did, once it knows
    ("3 files, 1.2 MiB")."""

    name: str
    detail: str = ""
    started: float = field(default_factory=time.monotonic)

    def seconds(self) -> float:
        return time.monotonic() - self.started


class Watcher(Protocol):
    def begin(self, phase: Phase) -> None: ...

    def end(self, phase: Phase, failed: bool) -> None: ...


_watcher: Watcher | None = None


def watch(watcher: Watcher | None) -> Watcher | None:
    """Send every phase to ``watcher`` from now on (None: to nobody); return the
    previous one."""
    global _watcher
    previous, _watcher = _watcher, watcher
    return previous


def amount(size: int) -> str:
    """A size for people: 812 B, 14.2 KiB, 1.3 MiB."""
    if size < 1024:
        return f"{size} B"
    if size < 2**20:
        return f"{size / 1024:.1f} KiB"
    return f"{size / 2**20:.1f} MiB"


@contextmanager
def phase(name: str) -> Iterator[Phase]:
    """Mark the block as the phase ``name`` (a few words, "-ing": "reading inputs")."""
    current = Phase(name)
    watcher = _watcher
    if watcher is None:
        yield current
        return
    watcher.begin(current)
    failed = True
    try:
        yield current
        failed = False
    finally:
        watcher.end(current, failed)
