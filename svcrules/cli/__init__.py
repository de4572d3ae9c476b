"""The command line: a thin shell over the library (Typer).

Exit codes: 0 success, 1 a difference (``diff``, ``check``), 2 nothing done (bad
input, usage, a refused change, the environment), 3 applied without the objects
``--on-invalid skip`` left out. Errors go to stderr; stdout only ever holds results.
"""

from __future__ import annotations

import gc

from svcrules.cli import commands, kernel_commands, serve_commands, trace_commands
from svcrules.cli.app import app

__all__ = ["app", "commands", "kernel_commands", "main", "serve_commands", "trace_commands"]


def main() -> None:
    # A command runs once and exits: leave memory to reference counting instead of
    # letting the cyclic collector rescan millions of live objects (see compiler.py).
    gc.disable()
    app()
