"""Talking to the kernel: libnftables through its Python binding, or ``nft``.

Only svcrules' own tables are ever listed (``list table ip NAME``), never the
whole ruleset: listing everything can crash an older nft when newer tools
created objects in it, and it costs time proportional to other owners' rules.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
from collections.abc import Sequence
from typing import Any, Protocol

from svcrules.errors import KernelError
from svcrules.kernel.nft import netlink
from svcrules.kernel.tools import find_tool

INSTALL_HINT = (
    "neither libnftables (libnftables.so.1) nor the nft command was found; install the OS "
    "package 'nftables' (Debian/Ubuntu: apt-get install nftables)"
)


KEEP_LINES = 3  # nft prints an error as: location and message, the command, carets
KEEP_CHARS = 300  # of each kept line: a command can hold thousands of elements


def refused(message: str) -> KernelError:
    """A KernelError with nft's message trimmed to its first error and a count of the
    rest, and the whole message in ``details``."""
    exc = KernelError(trim(message))
    exc.details = message
    return exc


def trim(message: str) -> str:
    lines = message.strip().splitlines()
    start = next((i for i, ln in enumerate(lines) if "Error:" in ln), 0)
    kept = [_cut(ln) for ln in lines[start : start + KEEP_LINES]]
    rest = len(lines) - len(kept)
    if rest > 0:
        kept.append(f"(and {rest} more lines)")
    return "\n".join(kept)


def first_error(exc: Exception) -> str:
    """One line for logs: the first error with the command it names, when nft gave one."""
    lines = str(exc).splitlines() or [""]
    i = next((i for i, ln in enumerate(lines) if "Error:" in ln), 0)
    line = lines[i]
    if "Error:" in line:
        line = "Error:" + line.split("Error:", 1)[1]
        if i + 1 < len(lines) and not lines[i + 1].startswith("(and "):
            line += f": {_cut(lines[i + 1].strip(), 120)}"
    return line


def _cut(line: str, limit: int = KEEP_CHARS) -> str:
    return line if len(line) <= limit else f"{line[:limit]}…"


class Backend(Protocol):
    name: str

    def run(self, script: str, *, check_only: bool = False, json_output: bool = False) -> str:
        """Run an nft script as one transaction; return its output."""
        ...

    def run_elements(self, changes: Sequence[netlink.ElementChange]) -> bool:
        """Send element additions and deletions as one transaction without nft (see
        svcrules.kernel.nft.netlink); False when this transport does not, or cannot
        encode them: the caller then runs the same change as an nft script."""
        ...

    def load_elsewhere(self, script: str, table: str) -> list[dict[str, Any]] | None:
        """The objects of ``script`` as this nft lists them once loaded somewhere that is
        not the node (``list table``, JSON, both families); None when not possible."""
        ...


class LibNftables:
    """libnftables through PyPI ``pip-nftables`` (no process per call)."""

    name = "libnftables"

    def __init__(self) -> None:
        import nftables  # imported here: it loads libnftables.so.1 at import time

        self._nft = nftables.Nftables()
        self._lib = ctypes.CDLL("libnftables.so.1")
        self._lib.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        # The binding has no dry-run switch; its context is the name-mangled __ctx.
        self._ctx = self._nft._Nftables__ctx

    def run(self, script: str, *, check_only: bool = False, json_output: bool = False) -> str:
        self._nft.set_json_output(json_output)
        self._lib.nft_ctx_set_dry_run(self._ctx, check_only)
        try:
            rc, out, err = self._nft.cmd(script)
        finally:
            self._lib.nft_ctx_set_dry_run(self._ctx, False)
        if rc != 0:
            raise refused(err.strip() or f"nft failed with code {rc}")
        return str(out)

    def run_elements(self, changes: Sequence[netlink.ElementChange]) -> bool:
        """Element changes over netlink: nft 1.0.6 would first read every chain of every
        table (0.3 s at 50,000 Services) for commands that need none of them."""
        try:
            netlink.send(netlink.encode(changes))
        except (netlink.Unsupported, netlink.Unavailable):
            return False
        except netlink.Failed as exc:
            raise refused(str(exc)) from None
        return True

    def load_elsewhere(self, script: str, table: str) -> list[dict[str, Any]] | None:
        return load_elsewhere(script, table)


class NftCommand:
    """The ``nft`` program: the fallback when the binding cannot load."""

    name = "nft"

    def __init__(self, path: str) -> None:
        self._path = path

    def run(self, script: str, *, check_only: bool = False, json_output: bool = False) -> str:
        args = [self._path]
        if check_only:
            args.append("--check")
        if json_output:
            args.append("--json")
        if json_output and "\n" not in script.strip():
            # nft 1.0.6 prints nothing for a listing read with -f in JSON mode: pass the
            # one command as arguments instead.
            args += script.split()
            script = ""
        else:
            args += ["-f", "-"]
        proc = subprocess.run(args, input=script, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise refused(proc.stderr.strip() or f"nft failed with code {proc.returncode}")
        return proc.stdout

    def run_elements(self, changes: Sequence[netlink.ElementChange]) -> bool:
        """The nft program is asked for by name: it runs every change."""
        return False

    def load_elsewhere(self, script: str, table: str) -> list[dict[str, Any]] | None:
        return load_elsewhere(script, table)


def open_backend(prefer: str = "auto") -> Backend:
    """libnftables if it loads, else the nft command; ``prefer`` forces one."""
    if prefer in ("auto", "libnftables"):
        try:
            return LibNftables()
        except (ImportError, OSError, AttributeError) as exc:
            if prefer == "libnftables":
                raise KernelError(f"cannot load libnftables: {exc}; {INSTALL_HINT}") from None
    path = find_tool("nft")
    if path is None:
        raise KernelError(INSTALL_HINT)
    return NftCommand(path)


def list_json(backend: Backend, what: str) -> list[dict[str, Any]]:
    """``list <what>`` as parsed libnftables JSON objects ([] when it does not exist)."""
    try:
        out = backend.run(f"list {what}", json_output=True)
    except KernelError as exc:
        if "No such file or directory" in str(exc):
            return []
        raise
    data = json.loads(out or '{"nftables": []}')
    return [o for o in data.get("nftables", []) if "metainfo" not in o]


def load_elsewhere(script: str, table: str) -> list[dict[str, Any]] | None:
    """The objects of ``script`` as nft lists them once loaded, in a network namespace
    made for the purpose and gone when nft exits (nothing of the node's is touched);
    None when that is not possible here."""
    nft, unshare = find_tool("nft"), find_tool("unshare")
    if nft is None or unshare is None:
        return None
    lister = " && ".join(f'"$0" -j list table {fam} {table}' for fam in ("ip", "ip6"))
    proc = subprocess.run(
        [unshare, "--net", "sh", "-c", f'"$0" -f - && {lister}', nft],
        input=script,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return None
    out: list[dict[str, Any]] = []
    for chunk in proc.stdout.splitlines():
        if chunk.strip():
            out += [o for o in json.loads(chunk).get("nftables", []) if "metainfo" not in o]
    return out
