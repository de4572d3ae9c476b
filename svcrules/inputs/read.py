"""Reading the inputs: files, directories (searched for *.yaml, *.yml, *.json) and
stdin, read once, bounded.

Only regular files and stdin are read, at most ``SVCRULES_MAX_INPUT_BYTES`` in all,
UTF-8 only: a FIFO, a device or ``/dev/zero`` given by mistake is refused before it
is opened, never read until memory runs out.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from svcrules.errors import InputError, Problem

SUFFIXES = (".yaml", ".yml", ".json")

MAX_INPUT_BYTES = 1 << 30  # all inputs of one run together; SVCRULES_MAX_INPUT_BYTES
MAX_OBJECTS = 1_000_000  # objects and List items of one run; SVCRULES_MAX_OBJECTS


@dataclass(frozen=True)
class Limits:
    """How much one run reads. The defaults hold a 50,000-Service cluster several
    times over; the environment can raise or lower them."""

    max_input_bytes: int = MAX_INPUT_BYTES
    max_objects: int = MAX_OBJECTS

    @classmethod
    def from_env(cls) -> Limits:
        values = {}
        for name, var in (
            ("max_input_bytes", "SVCRULES_MAX_INPUT_BYTES"),
            ("max_objects", "SVCRULES_MAX_OBJECTS"),
        ):
            raw = os.environ.get(var)
            if raw is None or not raw.strip():
                continue
            try:
                values[name] = int(raw.strip().replace("_", ""))
            except ValueError:
                values[name] = -1
            if values[name] < 1:
                raise InputError([Problem(None, "", f"{var}={raw!r}: expected a positive integer")])
        return cls(**values)


def _expand(paths: Iterable[str]) -> Iterator[str]:
    for raw in paths:
        if raw == "-":
            yield raw
            continue
        p = Path(raw)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
            yield from found
        else:
            yield raw


@dataclass(frozen=True)
class Source:
    """The text of one input, read once: hashed for the fast no-op path, then parsed."""

    path: str
    text: str


def _describe_mode(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _not_regular(path: str, mode: int) -> Problem:
    return Problem(
        None,
        "",
        f"{path}: refused: {_describe_mode(mode)}; give regular files, directories "
        "or '-' for stdin",
    )


def _decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            [
                Problem(
                    None,
                    "",
                    f"{path}: not UTF-8: byte 0x{data[exc.start]:02x} at byte offset {exc.start}",
                )
            ]
        ) from None


def _too_large(path: str, limit: int) -> InputError:
    return InputError(
        [
            Problem(
                None,
                "",
                f"{path}: refused: the inputs exceed {limit} bytes (SVCRULES_MAX_INPUT_BYTES)",
            )
        ]
    )


def _read_stdin(stdin: TextIO, budget: int, limit: int) -> tuple[str, int]:
    raw = getattr(stdin, "buffer", None)
    if raw is None:  # a text stream (tests, embedding programs)
        text = stdin.read(budget + 1)
        size = len(text.encode())
        if size > budget:
            raise _too_large("<stdin>", limit)
        return text, size
    chunks = bytearray()
    while len(chunks) <= budget:
        chunk = raw.read(min(1 << 20, budget + 1 - len(chunks)))
        if not chunk:
            break
        chunks += chunk
    if len(chunks) > budget:
        raise _too_large("<stdin>", limit)
    return _decode(bytes(chunks), "<stdin>"), len(chunks)


def _read_file(path: str, budget: int, limit: int) -> tuple[str, int]:
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise InputError([_not_regular(path, st.st_mode)])
        if st.st_size > budget:
            raise _too_large(path, limit)
        data = fh.read(budget + 1)
    if len(data) > budget:
        raise _too_large(path, limit)
    return _decode(data, path), len(data)


def read_sources(
    paths: Iterable[str], stdin: TextIO | None = None, limits: Limits | None = None
) -> list[Source]:
    """Read every input file (directories expanded, ``-`` for stdin). Only regular
    files and stdin are read, at most ``limits.max_input_bytes`` in all (default from
    the environment)."""
    limits = limits or Limits.from_env()
    budget = limits.max_input_bytes
    out: list[Source] = []
    problems: list[Problem] = []
    for path in _expand(paths):
        try:
            if path == "-":
                text, size = _read_stdin(stdin or sys.stdin, budget, limits.max_input_bytes)
                path = "<stdin>"
            elif not stat.S_ISREG(mode := _mode(path)) and mode:
                # Refused before opening: opening a FIFO blocks until a writer comes.
                raise InputError([_not_regular(path, mode)])
            else:
                text, size = _read_file(path, budget, limits.max_input_bytes)
        except OSError as exc:
            problems.append(Problem(None, "", f"{path}: cannot read: {exc.strerror}"))
            continue
        except InputError as exc:
            problems.extend(exc.problems)
            if any("SVCRULES_MAX_INPUT_BYTES" in p.message for p in exc.problems):
                break  # the budget is spent: reading on would only say so again
            continue
        budget -= size
        out.append(Source(path, text))
    if problems:
        raise InputError(problems)
    return out


def _mode(path: str) -> int:
    try:
        return os.stat(path).st_mode
    except OSError:
        return 0  # open() reports it
