"""One exclusive lock per state directory, taken by every command that writes
(``apply``, ``sync``, ``cleanup``), so that runs never interleave: two changes sent
at once would leave the kernel holding a mix that neither state describes."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from svcrules.errors import LockBusy, LockError, LockTimeout

DEFAULT_TIMEOUT = 60.0


@contextmanager
def exclusive(path: Path, wait: bool = True, timeout: float = DEFAULT_TIMEOUT) -> Iterator[None]:
    """Hold ``path`` locked (flock) for the block; released even if the process dies."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise LockError(f"cannot open the lock file {path}: {exc.strerror}") from None
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
                    raise LockTimeout(
                        f"gave up after {timeout:g}s waiting for {path}: another svcrules "
                        f"run holds it (raise --lock-timeout, or find the stuck run)"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)
