"""What the kernel reports about a traced packet (``Seen``, ``Event``), what a backend's
tracer does (``Tracer``), and the helpers the backends' tracers share; the trace
itself is svcrules.kernel.trace's ``trace_kernel``."""

from __future__ import annotations

import ctypes
import ipaddress
import os
import select
import signal
import subprocess
import termios
import time
from dataclasses import dataclass
from typing import Protocol

from svcrules.errors import KernelError
from svcrules.kernel.tools import find_tool
from svcrules.trace.model import Packet

POLL = 0.05  # seconds between looks at a monitor that has nothing to say yet
PR_SET_PDEATHSIG = 1
TRACE_COMMENT = "svcrules trace: temporary, deleted when the trace ends"


@dataclass(frozen=True)
class Seen:
    """The packet as one hook saw it, from the kernel's description of it."""

    src: str
    dst: str
    sport: int | None
    dport: int | None
    inbound: bool  # arrived on an interface (prerouting), not sent by the node (output)
    syn: bool | None = None  # TCP: SYN without ACK; None when unknown or not TCP


@dataclass(frozen=True)
class Event:
    """One thing the kernel reported about a traced packet: a rule it matched, the
    policy of a base chain, or the end of a chain."""

    key: str  # which packet: nft's trace id; iptables-legacy: what the packet carries
    table: str  # as in Step: "ip svcrules", "ipv4 nat"
    chain: str
    kind: str  # "rule", "policy" or "return"
    rule: str = ""  # as nft / iptables prints it
    verdict: str = "continue"  # accept, drop, continue, jump, goto, return
    target: str = ""  # of a jump or goto
    packet: Seen | None = None
    handle: int | None = None  # the rule's handle (nft) or number (iptables-legacy)
    tracer: bool = False  # in the temporary trace table or chain
    start: bool = False  # the first event of the packet's pass through a base chain
    own: bool = False  # a rule of svcrules' own tables or chains
    rejects: bool = False  # the rule's verdict drop is a reject
    masquerades: bool = False  # the rule masquerades


class Tracer(Protocol):
    """What one backend does for a trace (svcrules.kernel.nft.trace.NftTracer, and
    XtablesTracer and LegacyTracer in svcrules.kernel.iptables.trace)."""

    name: str  # Trace.backend: "nftables (kernel)", ...

    def start(self, deadline: float) -> None:
        """Install the trace rule and listen; return once no event can be missed."""
        ...

    def fileno(self) -> int:
        """What to wait on for events."""
        ...

    def read(self) -> list[Event]:
        """The events that arrived since the last call (never blocks)."""
        ...

    def resolve(self, events: list[Event]) -> list[Event]:
        """``events`` with what the kernel only referred to (a rule's handle or
        number) filled in from the rules as they are now."""
        ...

    def close(self) -> None:
        """Remove everything ``start`` installed and stop listening; idempotent.
        KernelError when something could not be removed."""
        ...


class EventParser(Protocol):
    def feed(self, lines: list[str]) -> list[Event]: ...


class MonitorEvents:
    """What the tracers that read a monitor command share: the monitor, the lines it
    printed while ``start`` waited for it to listen, and the parser of its lines."""

    parser: EventParser
    _monitor: Monitor | None
    _early: list[str]

    def fileno(self) -> int:
        assert self._monitor is not None
        return self._monitor.fileno()

    def read(self) -> list[Event]:
        assert self._monitor is not None
        lines, self._early = self._early + self._monitor.lines(), []
        return self.parser.feed(lines)


def family_of(packet: Packet) -> int:
    return ipaddress.ip_address(packet.dst).version


def _die_with_parent() -> None:
    """In the monitor's process: end when svcrules does, even when it is killed."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Monitor:
    """A monitor command (nft monitor, xtables-monitor) whose output is read line by
    line without blocking. Its output is a terminal of its own (a pseudo-terminal),
    so that it writes each line at once: xtables-monitor holds its output back in a
    buffer when it writes to a pipe."""

    def __init__(self, argv: list[str]) -> None:
        master, slave = os.openpty()
        mode = termios.tcgetattr(slave)
        mode[1] &= ~termios.OPOST  # "\n" stays "\n"
        termios.tcsetattr(slave, termios.TCSANOW, mode)
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=slave,
                stderr=subprocess.PIPE,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            os.close(master)
            raise KernelError(f"cannot run {argv[0]}: {exc}") from None
        finally:
            os.close(slave)
        self.argv = argv
        self._fd = master
        os.set_blocking(self._fd, False)
        self._buf = b""
        self.eof = False

    def fileno(self) -> int:
        return self._fd

    def lines(self) -> list[str]:
        """The complete lines that arrived; KernelError when the monitor stopped."""
        chunks = []
        while True:
            try:
                chunk = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                break
            except OSError:  # EIO: the monitor exited
                chunk = b""
            if not chunk:
                self.eof = True
                break
            chunks.append(chunk)
        data = self._buf + b"".join(chunks)
        *complete, self._buf = data.split(b"\n")
        out = [ln.decode(errors="replace") for ln in complete]
        if self.eof and not out:
            raise KernelError(f"{os.path.basename(self.argv[0])} stopped: {self.stderr()}")
        return out

    def wait_for(self, needle: str, deadline: float, keep: list[str]) -> bool:
        """Read lines (into ``keep``) until one holds ``needle``, or ``deadline``."""
        while True:
            for line in self.lines():
                keep.append(line)
                if needle in line:
                    return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([self._fd], [], [], min(left, POLL))

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return " ".join(self.proc.stderr.read().decode(errors="replace").split()) or (
            f"exit code {self.proc.returncode}"
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def run_tool(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelError(f"cannot run {argv[0]}: {exc}") from None


def require_tool(name: str, package: str) -> str:
    path = find_tool(name)
    if path is None:
        raise KernelError(f"the {name} command was not found; install the OS package {package!r}")
    return path


def removal_failed(what: str, how: str, detail: str) -> KernelError:
    return KernelError(f"could not remove the temporary {what} ({detail}); remove it with: {how}")
