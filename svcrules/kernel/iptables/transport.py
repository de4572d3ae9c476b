"""Talking to the kernel through the iptables tools (iptables-nft or iptables-legacy).

Each ``iptables-restore --noflush`` input replaces one table atomically and names
only svcrules' chains; ``iptables -S CHAIN`` reads one chain. Debian's ``iptables``
package ships both variants; ``auto`` uses whichever the alternatives system chose.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Protocol

from svcrules.errors import KernelError
from svcrules.kernel.iptables.restore import BUILTIN, RestoreTable, is_own_chain, parsed_from_save
from svcrules.kernel.tools import find_tool

INSTALL_HINT = "install the OS package 'iptables' (Debian/Ubuntu: apt-get install iptables)"
VARIANTS = ("auto", "nft", "legacy")
LOCK_WAIT = "5"  # seconds to wait for the xtables lock (iptables-legacy)


class Transport(Protocol):
    """What the driver needs of the iptables tools (Iptables; FakeIptables in tests)."""

    name: str  # iptables-nft or iptables-legacy

    def restore(self, family: str, text: str, *, check_only: bool = False) -> None:
        """Send one ``*table … COMMIT`` input; the kernel takes all of it or none."""
        ...

    def save(self, family: str, table: str) -> str:
        """``iptables-save -t TABLE``."""
        ...

    def list_chain(self, family: str, table: str, chain: str) -> str | None:
        """``iptables -S CHAIN`` output, or None when the chain does not exist."""
        ...

    def nft_chain_names(self, family: str, table: str) -> list[str] | None:
        """With iptables-nft, the table's chain names read cheaply from nft; else None."""
        ...

    def load_elsewhere(self, sections: list[tuple[tuple[str, str], str]]) -> dict[str, str] | None:
        """iptables-save of each family and table after loading ``sections`` somewhere
        that is not the node; None when that is not possible here."""
        ...

    def drop_if_empty(self, family: str, table: str) -> bool:
        """With iptables-nft, delete the nft table when nothing but empty built-in chains
        is left in it."""
        ...


def read_chains(kernel: Transport, family: str, table: str, chains: list[str]) -> str:
    """The rules of a few chains, in iptables-save form. iptables-legacy fetches the
    whole table for any listing, so one iptables-save serves them all; iptables-nft
    lists one chain cheaply but a whole table slowly (77 s at 10,000 Services)."""
    if kernel.name == "iptables-legacy":
        wanted = tuple(f"-A {c} " for c in chains)
        return "".join(
            f"{ln}\n" for ln in kernel.save(family, table).splitlines() if ln.startswith(wanted)
        )
    return "".join(kernel.list_chain(family, table, c) or "" for c in chains)


def owned(kernel: Transport, family: str, table: str, prefix: str) -> RestoreTable:
    """svcrules' chains and jumps in one table. With iptables-legacy, read whole
    (iptables-save is quick); with iptables-nft, only the chain names (from nft, as
    iptables-nft-save takes minutes at scale) and the built-in chains' jumps."""
    names = kernel.nft_chain_names(family, table)
    if names is None:
        return parsed_from_save(kernel.save(family, table), prefix)
    out = parsed_from_save(read_chains(kernel, family, table, list(BUILTIN)), prefix)
    out.chains = {name: [] for name in sorted(n for n in names if is_own_chain(n, prefix))}
    out.complete = False
    return out


def chain_names(kernel: Transport, family: str, table: str) -> list[str]:
    """The names of every chain in one table (cheaply, with iptables-nft: from nft)."""
    names = kernel.nft_chain_names(family, table)
    if names is None:
        save = kernel.save(family, table)
        names = [ln[1:].split(" ", 1)[0] for ln in save.splitlines() if ln.startswith(":")]
    return sorted(names)


class Iptables:
    """The iptables commands of one variant, for both families."""

    def __init__(self, variant: str = "auto") -> None:
        if variant not in VARIANTS:
            raise KernelError(
                f"unknown iptables variant {variant!r}: use one of {', '.join(VARIANTS)}"
            )
        suffix = "" if variant == "auto" else f"-{variant}"
        self._tools: dict[tuple[str, str], str] = {}
        for family, base in (("ipv4", "iptables"), ("ipv6", "ip6tables")):
            for role in ("", "-save", "-restore"):
                name = f"{base}{suffix}{role}"
                path = find_tool(name)
                if path is None:
                    raise KernelError(f"the {name} command was not found; {INSTALL_HINT}")
                self._tools[(family, role)] = path
        self.variant = variant
        self.name = f"iptables-{variant}" if variant != "auto" else self._auto_name()

    def _auto_name(self) -> str:
        out = self._run([self._tools[("ipv4", "")], "--version"]).stdout
        return "iptables-nft" if "nf_tables" in out else "iptables-legacy"

    @staticmethod
    def _run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(args, input=stdin, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise KernelError(f"cannot run {args[0]}: {exc}") from None

    def restore(self, family: str, text: str, *, check_only: bool = False) -> None:
        """Send one ``*table … COMMIT`` input; the kernel takes all of it or none."""
        args = [self._tools[(family, "-restore")], "--noflush", "-w", LOCK_WAIT]
        if check_only:
            args.append("--test")
        proc = self._run(args, text)
        if proc.returncode != 0:
            err = _quiet(proc.stderr) or f"exit code {proc.returncode}"
            raise KernelError(f"{args[0]} refused the change: {with_line(err, text)}")

    def save(self, family: str, table: str) -> str:
        proc = self._run([self._tools[(family, "-save")], "-t", table])
        if proc.returncode != 0:
            raise KernelError(f"iptables-save -t {table} failed: {_quiet(proc.stderr)}")
        return proc.stdout

    def list_chain(self, family: str, table: str, chain: str) -> str | None:
        """``iptables -S CHAIN`` output, or None when the chain does not exist."""
        proc = self._run([self._tools[(family, "")], "-w", LOCK_WAIT, "-t", table, "-S", chain])
        return proc.stdout if proc.returncode == 0 else None

    def nft_chain_names(self, family: str, table: str) -> list[str] | None:
        """With iptables-nft and nft at hand, the table's chain names; else None."""
        nft = find_tool("nft")
        if self.name != "iptables-nft" or nft is None:
            return None
        nft_family = "ip" if family == "ipv4" else "ip6"
        proc = self._run([nft, "-j", "list", "chains", nft_family])
        if proc.returncode != 0:
            return None
        return [
            o["chain"]["name"]
            for o in json.loads(proc.stdout or "{}").get("nftables", [])
            if "chain" in o and o["chain"].get("table") == table
        ]

    def load_elsewhere(self, sections: list[tuple[tuple[str, str], str]]) -> dict[str, str] | None:
        """Restore ``sections`` into a network namespace made for the purpose (gone when
        the commands exit; nothing of the node's is touched) and return iptables-save
        of each family and table there ("ipv4 nat" -> text): how this variant lists
        exactly those rules. None when that is not possible here (no ``unshare``)."""
        unshare = find_tool("unshare")
        if unshare is None:
            return None
        with tempfile.TemporaryDirectory(prefix="svcrules-verify-") as tmp:
            steps = ["set -e"]
            for i, ((family, _), text) in enumerate(sections):
                path = Path(tmp, str(i))
                path.write_text(text)
                tool = self._tools[(family, "-restore")]
                steps.append(f"{shlex.quote(tool)} --noflush -w {LOCK_WAIT} {path}")
            for family in ("ipv4", "ipv6"):
                for table in ("nat", "filter"):
                    steps.append(f"echo '#> {family} {table}'")
                    steps.append(f"{shlex.quote(self._tools[(family, '-save')])} -t {table}")
            proc = self._run([unshare, "--net", "sh", "-c", "\n".join(steps)])
        if proc.returncode != 0:
            return None
        out: dict[str, list[str]] = {}
        current: list[str] = []
        for line in proc.stdout.splitlines():
            if line.startswith("#> "):
                current = out.setdefault(line[3:], [])
            else:
                current.append(line)
        return {part: "".join(f"{ln}\n" for ln in lines) for part, lines in out.items()}

    def drop_if_empty(self, family: str, table: str) -> bool:
        """With iptables-nft, delete the nft table behind ``table`` when it holds nothing
        but the built-in base chains, without a rule, as iptables-nft creates them, so
        that cleanup leaves no trace in ``nft list ruleset``. It is read with nft itself:
        iptables-nft-save leaves out what it cannot show (native nft chains of another
        owner). iptables-legacy tables cannot be deleted; they stay, empty."""
        if self.name != "iptables-nft" or (nft := find_tool("nft")) is None:
            return False
        nft_family = "ip" if family == "ipv4" else "ip6"
        proc = self._run([nft, "-j", "list", "table", nft_family, table])
        if proc.returncode != 0:
            return False
        for obj in json.loads(proc.stdout or "{}").get("nftables", []):
            kind = next(iter(obj))
            if kind in ("metainfo", "table"):
                continue
            body = obj[kind]
            builtin = body.get("name") in BUILTIN and "hook" in body
            if kind != "chain" or not builtin or body.get("policy", "accept") != "accept":
                return False
        proc = self._run([nft, "delete", "table", nft_family, table])
        return proc.returncode == 0


def with_line(err: str, text: str) -> str:
    """iptables-restore names the input line it failed at ("line 10 failed", or
    "line 10: CHAIN_DEL failed ..."), and iptables-legacy says nothing more: show it.
    Deleting a chain that another owner's rule still jumps to is the refusal one runs
    into, so say so."""
    m = re.search(r"\bline (\d+)(?: failed|:)", err)
    lines = text.splitlines()
    if not m or not 0 < int(m.group(1)) <= len(lines):
        return err
    line = lines[int(m.group(1)) - 1]
    shown = line if len(line) <= 300 else f"{line[:300]}…"
    out = f"{err}: {shown}"
    if line.startswith("-X "):
        out += " (a rule svcrules does not own may still jump to this chain)"
    return out


def _quiet(stderr: str) -> str:
    """stderr without the warnings iptables-nft prints whenever legacy tables exist."""
    return " ".join(ln for ln in stderr.strip().splitlines() if not ln.startswith("# Warning"))
