"""Building and reading millions of small objects without the cyclic collector."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def no_cyclic_gc() -> Iterator[None]:
    """Compiling builds millions of objects and frees none until the end; the cyclic
    collector would walk them all again and again (a third of the time at 10,000
    Services; reading the compile cache back, five times longer). Reference counting still
    frees everything as usual."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
