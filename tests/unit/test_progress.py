"""Progress of long phases: a transient spinner on stderr when it is a terminal,
nothing at all when it is not; with -v, one line per phase either way."""

from __future__ import annotations

import io
import logging
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

import svcrules
from svcrules import progress
from svcrules.cli.logs import LOG, setup
from svcrules.cli.progress import Display, watching

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = (ROOT / "fixtures/kubectl-list/all.yaml").read_bytes()
RULES = svcrules.compile_paths(["-"], stdin=io.StringIO(KUBECTL.decode())).nft.encode()
SVCRULES = str(Path(sys.executable).parent / "svcrules")


def _slow_compile(stderr: int, *args: str, env: dict[str, str] | None = None) -> bytes:
    """``svcrules compile -`` whose stdin arrives after a second, as from a slow
    kubectl: the phase "reading inputs" lasts that long. Returns stdout."""
    proc = subprocess.Popen(
        [SVCRULES, "compile", *args, "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env={**os.environ, "TERM": "xterm", **(env or {})},
    )
    assert proc.stdin is not None and proc.stdout is not None
    time.sleep(1.2)
    proc.stdin.write(KUBECTL)
    proc.stdin.close()
    out = proc.stdout.read()
    assert proc.wait(timeout=60) == 0
    return out


def _drain(fd: int) -> bytes:
    data = b""
    while select.select([fd], [], [], 0.5)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the other end closed (Linux: EIO)
            break
        if not chunk:
            break
        data += chunk
    return data


def test_not_a_terminal_nothing_on_stderr() -> None:
    proc = subprocess.Popen(
        [SVCRULES, "compile", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "TERM": "xterm"},
    )
    time.sleep(1.2)
    out, err = proc.communicate(KUBECTL, timeout=60)
    assert proc.returncode == 0 and out == RULES
    assert err == b""


def test_a_terminal_sees_a_transient_spinner() -> None:
    master, slave = pty.openpty()
    try:
        out = _slow_compile(slave)
        os.close(slave)
        shown = _drain(master)
    finally:
        os.close(master)
    assert out == RULES  # stdout holds the rules and nothing of the display
    assert b"reading inputs" in shown
    assert b"\x1b[2K" in shown  # ... and the line is erased again (transient)
    assert b"info:" not in shown  # without -v no log lines


def test_a_terminal_with_verbose_sees_both() -> None:
    master, slave = pty.openpty()
    try:
        out = _slow_compile(slave, "-v")
        os.close(slave)
        shown = _drain(master).decode()
    finally:
        os.close(master)
    assert out == RULES
    assert "svcrules: info: reading inputs: 1 file" in shown
    assert "svcrules: info: rendering nftables rules:" in shown


def test_a_quick_run_shows_no_spinner() -> None:
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            [SVCRULES, "compile", "-"],
            input=KUBECTL,
            stdout=subprocess.PIPE,
            stderr=slave,
            env={**os.environ, "TERM": "xterm"},
            check=True,
        )
        os.close(slave)
        shown = _drain(master)
    finally:
        os.close(master)
    assert proc.stdout == RULES
    assert shown == b""


def test_no_watcher_costs_nothing_and_nests() -> None:
    assert progress.watch(None) is None
    with progress.phase("outer") as outer, progress.phase("inner") as inner:
        inner.detail = "x"
    assert (outer.name, inner.detail) == ("outer", "x")


def test_verbose_lines_for_completed_phases_only(caplog: pytest.LogCaptureFixture) -> None:
    setup("text")
    LOG.propagate = True  # for caplog
    try:
        with caplog.at_level(logging.INFO, "svcrules"), watching(verbose=True) as display:
            assert isinstance(display, Display) and not display.terminal  # pytest's stderr
            with progress.phase("reading inputs") as p:
                p.detail = "2 files, 1.0 KiB"
            with pytest.raises(ValueError), progress.phase("planning Services"):
                raise ValueError
    finally:
        LOG.propagate = False
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "reading inputs: 2 files, 1.0 KiB"
    ]
    assert caplog.records[0].fields["phase"] == "reading inputs"  # type: ignore[attr-defined]
    assert progress.watch(None) is None  # watching() put the previous watcher back


def test_amount() -> None:
    assert [progress.amount(n) for n in (812, 14540, 3 * 2**20)] == [
        "812 B",
        "14.2 KiB",
        "3.0 MiB",
    ]
