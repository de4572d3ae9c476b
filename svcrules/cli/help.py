"""Help pages as plain text, the same on a terminal, in a pipe and in a journal.

Typer's default help draws Rich panels: box characters and colour codes in a pipe, a
three-column table that breaks sentences mid-line and cuts option names at 80
columns, and metavars such as ``<list[str]>``. svcrules writes its help the way nft,
kubectl and git do instead: a usage line, the description as wrapped paragraphs, and
a list of options whose names are never cut (a long one puts its help on the next
line). It also keeps Rich out of ``svcrules --help``, which starts faster for it.

Paragraphs of a command's docstring are re-wrapped to the width (at most 80 columns);
a paragraph whose first line is indented (an example command) is printed as written.
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any, get_args

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

COL = 24  # the names column; longer names put their help on the next line
GAP = 2
INDENT = 2
_KEEP = "\x00"  # a space that wrapping must not break at


def width() -> int:
    """Columns to fill: the terminal's (or $COLUMNS) up to 80, less a margin of
    two; 78 in a pipe."""
    return max(min(shutil.get_terminal_size().columns, 80) - 2, 40)


def _paragraphs(text: str, width: int, indent: int) -> str:
    """Re-wrap prose, keep indented blocks (examples) as they are."""
    out = []
    pad = " " * indent
    for block in textwrap.dedent(text).strip("\n").split("\n\n"):
        lines = block.split("\n")
        if not lines or not block.strip():
            continue
        if lines[0].startswith(" "):
            out.append("\n".join(pad + line for line in lines))
        else:
            out.append(
                textwrap.fill(
                    " ".join(line.strip() for line in lines),
                    width,
                    initial_indent=pad,
                    subsequent_indent=pad,
                    break_long_words=False,
                    break_on_hyphens=False,
                )
            )
    return "\n\n".join(out)


def _rows(rows: Sequence[tuple[str, str]], width: int) -> str:
    """A definition list: names, then their help wrapped in its own column; a name
    too long for the column gets a line of its own."""
    out = []
    col = min(max((len(name) for name, _ in rows), default=0), COL)
    left = INDENT + col + GAP
    for name, help_ in rows:
        head = " " * INDENT + name
        if not help_:
            out.append(head)
            continue
        body = textwrap.wrap(
            help_, max(width - left, 20), break_long_words=False, break_on_hyphens=False
        )
        if len(name) <= col:
            out.append(head.ljust(left) + body[0])
            body = body[1:]
        else:
            out.append(head)
        out += [" " * left + line for line in body]
    return "\n".join(out).replace(_KEEP, " ")


def metavar(param: Any) -> str:
    """What a value of the option looks like: the declared metavar, the choices
    (nft|json), or a word for the type; never a Python type."""
    if param.metavar:
        return str(param.metavar)
    desc = param.type_descriptor
    if desc.is_choice and desc.choices:
        return "|".join(str(c.value if isinstance(c, Enum) else c) for c in desc.choices)
    annotation = desc.annotation
    if desc.is_list:
        annotation = get_args(annotation)[0]
    if annotation is Path:
        return "PATH"
    if annotation is int:
        return "N"
    if annotation is float:
        return "NUMBER"
    return "TEXT"


def _default(param: Any) -> str:
    value = param.default
    if param.is_flag or value is None or value == [] or param.show_default is False:
        return ""
    if isinstance(param.show_default, str):
        return param.show_default
    if isinstance(value, Enum):
        value = value.value
    return str(value)


def option_row(param: TyperOption) -> tuple[str, str]:
    """``-o, --output FORMAT`` and its help, with the default and environment
    variable where there are any."""
    names = sorted(param.opts, key=lambda o: (o.startswith("--"), o))
    name = ", ".join(names)
    if param.secondary_opts:
        name += " / " + ", ".join(param.secondary_opts)
    if not param.is_flag and not param.count:
        name += " " + metavar(param)
    extra = []
    if default := _default(param):
        extra.append(f"default: {default}")
    if param.envvar:
        extra.append(f"env: {param.envvar}")
    help_ = param.help or ""
    if extra:
        # Kept on one line: a wrapped "[default:" / "nft]" reads badly.
        joined = "; ".join(item.replace(" ", _KEEP) for item in extra)
        help_ = f"{help_} [{joined}]".strip()
    return name, help_


def argument_row(param: TyperArgument) -> tuple[str, str]:
    name = str(param.metavar or param.name or "").upper()
    if param.nargs != 1:
        name += "..."
    return name, param.help or ""


def _usage(command: Any, ctx: typer.Context, width: int) -> str:
    pieces = ["[OPTIONS]"] if command.get_params(ctx) else []
    for param in command.get_params(ctx):
        if isinstance(param, TyperArgument) and not param.hidden:
            name = str(param.metavar or param.name or "").upper()
            name = name if param.required else f"[{name}]"
            pieces.append(name + ("..." if param.nargs != 1 else ""))
    if isinstance(command, TyperGroup):
        pieces.append("COMMAND [ARGS]...")
    prefix = f"Usage: {ctx.command_path} "
    return textwrap.fill(
        " ".join(pieces),
        width,
        initial_indent=prefix,
        subsequent_indent=" " * len(prefix),
        break_long_words=False,
        break_on_hyphens=False,
    )


def page(command: Any, ctx: typer.Context, width: int, extra: Sequence[str] = ()) -> str:
    """The whole help page of ``command``."""
    parts = [_usage(command, ctx, width)]
    if command.help:
        parts.append(_paragraphs(command.help.partition("\f")[0], width, INDENT))
    params = [p for p in command.get_params(ctx) if not p.hidden]
    arguments = [argument_row(p) for p in params if isinstance(p, TyperArgument)]
    options = [option_row(p) for p in params if isinstance(p, TyperOption)]
    if arguments:
        parts.append("Arguments:\n" + _rows(arguments, width))
    if options:
        parts.append("Options:\n" + _rows(options, width))
    parts += extra
    if command.epilog:
        parts.append(_paragraphs(command.epilog, width, INDENT))
    return "\n\n".join(parts) + "\n"


def summary(command: Any) -> str:
    """One line about a command for the list of commands: its short help, else the
    first sentence of its help (never cut)."""
    if command.short_help:
        return " ".join(str(command.short_help).split())
    text = " ".join((command.help or "").partition("\n\n")[0].split())
    first, dot, _ = text.partition(". ")
    return first + "." if dot else text


class Command(TyperCommand):
    def format_help(self, ctx: typer.Context, formatter: Any) -> None:  # type: ignore[override]
        formatter.write(page(self, ctx, width()))


class Group(TyperGroup):
    def format_help(self, ctx: typer.Context, formatter: Any) -> None:  # type: ignore[override]
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, summary(cmd)))
        commands = "Commands:\n" + _rows(rows, width()) if rows else ""
        formatter.write(page(self, ctx, width(), [commands] if commands else []))
