"""Talking to the kernel: libnftables through its Python binding, or ``nft``.

Only svcrules' own tables are ever listed (``list table ip NAME``), never the
whole ruleset: listing everything can crash an older nft when newer tools
created objects in it, and it costs time proportional to other owners' rules.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
from typing import Any, Protocol

from svcrules.errors import SvcrulesError
from svcrules.tools import find_tool

INSTALL_HINT = (
    "neither libnftables (libnftables.so.1) nor the nft command was found; install the OS "
    "package 'nftables' (Debian/Ubuntu: apt-get install nftables)"
)


class KernelError(SvcrulesError):
    """The kernel (or nft) refused a command; the message is nft's."""


class Backend(Protocol):
    name: str

    def run(self, script: str, *, check_only: bool = False, json_output: bool = False) -> str:
        """Run an nft script as one transaction; return its output."""
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
            raise KernelError(err.strip() or f"nft failed with code {rc}")
        return str(out)


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
            raise KernelError(proc.stderr.strip() or f"nft failed with code {proc.returncode}")
        return proc.stdout


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
