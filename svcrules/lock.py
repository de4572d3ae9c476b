"""An exclusive lock so that overlapping cron or timer runs never interleave."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from svcrules.errors import SvcrulesError


class LockBusy(SvcrulesError):
    """Another run holds the lock and we were told not to wait (or waited too long)."""


@contextmanager
def exclusive(path: Path, wait: bool, timeout: float) -> Iterator[None]:
    """Hold ``path`` locked (flock) for the block; released even if the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    raise LockBusy(f"{path} is held by another svcrules run") from None
                if time.monotonic() >= deadline:
                    raise LockBusy(f"gave up after {timeout:g}s waiting for {path}") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)
