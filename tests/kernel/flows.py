"""Many flows at once, and connections that outlive a change, for the load-balancing
tests (test_load_balancing.py).

:func:`udp_flows` sends one datagram from each of thousands of fixed source ports (one
process in the client namespace, flow_agent.py) and reads back, from the node's
conntrack table, the endpoint each flow was sent to: for the kernel, every source port
is a new flow and the node's rules decide its endpoint, so no answer is awaited.
:class:`NsProcess` runs flow_agent.py's ``echo`` and ``hold`` roles.

What the tests measured is kept in :data:`FIGURES` and printed in the terminal summary
(conftest.py).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from .lab import Lab, LabError
from .observe import conntrack

FLOW_AGENT = Path(__file__).with_name("flow_agent.py")

# One line per measurement (what, figure), printed by conftest's terminal summary.
FIGURES: list[str] = []


def report(line: str) -> None:
    """Keep a measured figure for the summary (and show it at once under ``pytest -s``)."""
    FIGURES.append(line)
    print(f"load balancing: {line}")


Flow = tuple[str, int]  # the client's address and source port


def udp_flows(
    lab: Lab,
    dst: str,
    port: int,
    sports: range,
    *,
    sources: Sequence[str] = (),
    flush: bool = True,
    timeout: float = 10.0,
) -> dict[Flow, str]:
    """Send one datagram to dst:port from the client, from every port in ``sports``
    (and each address of ``sources``; default: the client's own), and return
    {(source address, source port): address of the endpoint the node sent it to}.

    ``flush`` empties the node's conntrack table first, so that no earlier flow with
    the same 5-tuple decides the endpoint (leave it False while a connection that must
    survive is open, and use source ports not used before)."""
    if flush:
        lab.exec("node", "conntrack", "-F")
    srcs = list(sources) or [lab.ip("client", 6 if ":" in dst else 4)]
    cmd = [sys.executable, str(FLOW_AGENT), "udp", dst, str(port)]
    cmd += [str(sports.start), str(sports[-1]), *sources]
    sent = lab.exec("client", *cmd, timeout=60).stdout.strip()
    assert sent == str(len(sports) * len(srcs)), f"flow sender: {sent!r}"
    # Netfilter confirms an entry when the packet leaves the node; the last datagrams
    # may still be on their way when the sender exits.
    wanted = {(src, sport) for src in srcs for sport in sports}
    deadline = time.monotonic() + timeout
    while True:
        seen = {
            (e.src, e.sport): e.reply_src
            for e in conntrack(lab, 6 if ":" in dst else 4, "udp")
            if e.dst == dst and e.dport == port and (e.src, e.sport) in wanted
        }
        if len(seen) == len(wanted) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    missing = sorted(wanted - seen.keys())
    assert not missing, f"{len(missing)} of {len(wanted)} flows have no entry: {missing[:10]}"
    return seen


def moved(before: dict[Flow, str], after: dict[Flow, str]) -> float:
    """Fraction of the flows whose endpoint changed."""
    assert before.keys() == after.keys()
    return sum(before[f] != after[f] for f in before) / len(before)


class NsProcess:
    """flow_agent.py in a lab namespace, talked to line by line; killed on exit (it also
    exits by itself when its stdin closes, i.e. when the test process dies)."""

    def __init__(self, lab: Lab, ns: str, *args: str) -> None:
        self.what = f"flow_agent {' '.join(args)} in {ns}"
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.netns(ns), sys.executable, str(FLOW_AGENT), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            start_new_session=True,
        )
        self._buf = b""

    def readline(self, timeout: float = 10.0) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LabError(f"{self.what}: no answer in {timeout} s")
            if not select.select([fd], [], [], left)[0]:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise LabError(f"{self.what} exited (rc={self.proc.wait(5)}):\n{err}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def ask(self, line: str, timeout: float = 10.0) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\n".encode())
        return self.readline(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> NsProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def echo_servers(lab: Lab, pods: Sequence[str], port: int) -> list[NsProcess]:
    """An echo server on ``port`` in each pod, greeting with the pod's name."""
    servers: list[NsProcess] = []
    try:
        for pod in pods:
            servers.append(NsProcess(lab, pod, "echo", str(port), pod))
        for server in servers:
            ready = server.readline()
            assert ready == "ready", f"{server.what}: {ready!r}"
    except BaseException:
        for server in servers:
            server.close()
        raise
    return servers
