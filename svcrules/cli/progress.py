"""What a run shows of its long phases (``svcrules.progress``).

On a terminal (stderr is a TTY), a phase that lasts more than ``DELAY`` seconds gets
a transient spinner on stderr with its name and elapsed time, drawn by Rich and
erased when the phase ends (the phase right after one that had a spinner gets its
own at once): quick runs show nothing, and stdout never carries any of it. With
``-v``, every phase that completed is logged on stderr with what it did and how long
it took, terminal or not. When stderr is not a terminal (a pipe, a file, journald)
and without ``-v``, nothing is written at all.

Rich is imported only when a spinner is about to be drawn.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from svcrules import progress
from svcrules.cli.logs import LOG
from svcrules.progress import Phase

DELAY = 0.3  # seconds a phase runs before its spinner appears
# ... unless a spinner was erased this recently: the next phase of a long run shows at once
FOLLOW = 0.5


def on_terminal() -> bool:
    """Whether stderr is a terminal that can take a spinner."""
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False
    return tty and os.environ.get("TERM", "") != "dumb"


class Display:
    """A ``progress.Watcher``: the spinner, and the ``-v`` lines."""

    def __init__(self, verbose: bool, terminal: bool) -> None:
        self.verbose = verbose
        self.terminal = terminal
        self.active: list[Phase] = []
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._bar: Any = None  # rich.progress.Progress, while shown
        self._tasks: dict[int, Any] = {}
        self._hidden_at = -FOLLOW  # time.monotonic() when a spinner was last erased

    def begin(self, phase: Phase) -> None:
        with self._lock:
            self.active.append(phase)
            if not self.terminal:
                return
            if self._bar is not None:
                self._add(phase)
            elif self._timer is None:
                recent = time.monotonic() - self._hidden_at < FOLLOW
                self._timer = threading.Timer(0.0 if recent else DELAY, self._show)
                self._timer.daemon = True
                self._timer.start()

    def end(self, phase: Phase, failed: bool) -> None:
        with self._lock:
            if phase in self.active:
                self.active.remove(phase)
            if self._bar is not None and id(phase) in self._tasks:
                self._bar.remove_task(self._tasks.pop(id(phase)))
            if not self.active:
                self._hide()
        if self.verbose and not failed:
            seconds = phase.seconds()
            detail = f": {phase.detail}" if phase.detail else ""
            fields = {"event": "phase", "phase": phase.name, "seconds": round(seconds, 4)}
            if phase.detail:
                fields["detail"] = phase.detail
            LOG.info("%s%s (%.2f s)", phase.name, detail, seconds, extra={"fields": fields})

    def close(self) -> None:
        with self._lock:
            self.active.clear()
            self._hide()

    def _show(self) -> None:
        """Draw the spinner (in the timer's thread), unless the phases are over."""
        with self._lock:
            if not self.active or self._bar is not None:
                return
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn

            self._bar = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                TextColumn("{task.fields[elapsed]}", style="progress.elapsed"),
                console=Console(stderr=True),
                transient=True,
                redirect_stdout=False,  # stdout holds results: never through the display
                redirect_stderr=True,  # log lines print above the spinner
                refresh_per_second=8,
            )
            self._bar.start()
            for phase in self.active:
                self._add(phase)
            threading.Thread(target=self._tick, args=(self._bar,), daemon=True).start()

    def _add(self, phase: Phase) -> None:
        elapsed = f"{phase.seconds():.0f} s"
        self._tasks[id(phase)] = self._bar.add_task(phase.name, total=None, elapsed=elapsed)

    def _tick(self, bar: Any) -> None:
        """Keep the elapsed seconds current while the display is up."""
        stop = threading.Event()
        while not stop.wait(0.5):
            with self._lock:
                if self._bar is not bar:
                    return
                for phase in self.active:
                    task = self._tasks.get(id(phase))
                    if task is not None:
                        bar.update(task, elapsed=f"{phase.seconds():.0f} s")

    def _hide(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            self._tasks.clear()
            self._hidden_at = time.monotonic()


@contextmanager
def watching(verbose: bool) -> Iterator[Display]:
    """Show the phases of the block (see the module's docstring)."""
    display = Display(verbose, on_terminal())
    previous = progress.watch(display)
    try:
        yield display
    finally:
        display.close()
        progress.watch(previous)
