"""Throw-away network-namespace topology for testing nftables rulesets.

Every namespace is named ``<prefix><role>`` with a prefix unique to one
:class:`Lab` instance (``svk<pid>-<hex>-``), and every ``ip``/``nft``/``sysctl``
command runs inside one of them (``ip -n`` / ``ip netns exec``), so the host's
interfaces, routes and ruleset are never touched and parallel or crashed runs
cannot collide.

Topology (N pods, default 4)::

    client 192.0.2.100/24      eth0 ──── eth0  node 192.0.2.1/24
           2001:db8:1::100/64                    2001:db8:1::1/64
                                                 dummy0 198.18.0.1/32, 2001:db8:18::1/128
                                                 203.0.113.0/24, 2001:db8:3::/64 -> dummy0
    podI   198.51.100.(10+I)/32  eth0 ── vpodI   host routes to each pod (src = node IP)
           2001:db8:2::(10+I)/128                (gateway for pods: 169.254.1.1 / fe80::1)

Neighbour entries on every link are static (``nud permanent``), so no probe
ever waits for ARP or neighbour discovery.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

AGENT = Path(__file__).with_name("agent.py")

DEFAULT_PORTS: tuple[int, ...] = (8080, 8081, 9090, 5353)

NODE_IP4 = "192.0.2.1"
NODE_IP6 = "2001:db8:1::1"
CLIENT_IP4 = "192.0.2.100"
CLIENT_IP6 = "2001:db8:1::100"
NODE_DUMMY_IP4 = "198.18.0.1"
NODE_DUMMY_IP6 = "2001:db8:18::1"
POD_CIDR4 = "198.51.100.0/24"
POD_CIDR6 = "2001:db8:2::/64"
SERVICE_CIDR4 = "203.0.113.0/24"
SERVICE_CIDR6 = "2001:db8:3::/64"
POD_GW4 = "169.254.1.1"
POD_GW6 = "fe80::1"

NODE_MAC = "02:00:00:00:00:01"
CLIENT_MAC = "02:00:00:00:00:64"

_STALE_RE = re.compile(r"^svk(\d+)-[0-9a-f]{4}-")

# Applied in every namespace before any interface exists, so that the
# "default" values are inherited by every interface created afterwards.
_COMMON_SYSCTLS = (
    "net.ipv6.conf.all.accept_dad=0",
    "net.ipv6.conf.default.accept_dad=0",
    "net.ipv4.conf.all.rp_filter=0",
    "net.ipv4.conf.default.rp_filter=0",
    "net.ipv4.conf.all.accept_redirects=0",
    "net.ipv4.conf.default.accept_redirects=0",
    "net.ipv6.conf.all.accept_redirects=0",
    "net.ipv6.conf.default.accept_redirects=0",
    "net.ipv4.icmp_ratelimit=0",
    "net.ipv6.icmp.ratelimit=0",
)
# Not on every kernel; set with ``sysctl -e``. An empty ratemask also exempts
# ICMP errors from the global (per-netns) ICMP budget.
_OPTIONAL_SYSCTLS = (
    "net.ipv4.icmp_ratemask=0",
    "net.ipv6.icmp.ratemask=",
    "net.ipv4.icmp_msgs_per_sec=100000",
    "net.ipv4.icmp_msgs_burst=100000",
)
_NODE_SYSCTLS = (
    "net.ipv4.ip_forward=1",
    "net.ipv6.conf.all.forwarding=1",
    "net.ipv6.conf.default.forwarding=1",
    # Hairpin traffic (pod -> service -> same pod) leaves by the interface it
    # came in on; a redirect would only confuse the pod.
    "net.ipv4.conf.all.send_redirects=0",
    "net.ipv4.conf.default.send_redirects=0",
    "net.ipv4.conf.all.route_localnet=0",
)


class LabError(RuntimeError):
    """A lab command or agent failed; the message carries its stderr."""


@dataclass(frozen=True)
class Result:
    """One connection attempt made by a client agent."""

    outcome: str  # "ok" | "refused" | "timeout" | "unreachable" | "error"
    backend: str | None
    seen_src: str | None
    port: int | None
    elapsed: float
    detail: str
    sport: int | None = None


def run(
    cmd: Sequence[str],
    *,
    input: str | None = None,
    check: bool = True,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise LabError with its stderr."""
    proc = subprocess.run(
        list(cmd), input=input, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise LabError(
            f"command failed (rc={proc.returncode}): {' '.join(cmd)}\n"
            f"{proc.stderr.strip()}\n{proc.stdout.strip()}".rstrip()
        )
    return proc


def run_parallel(cmds: Sequence[tuple[Sequence[str], str | None]], timeout: float = 30.0) -> None:
    """Run independent commands concurrently (startup speed); raise on the first failure."""
    procs = [
        (
            cmd,
            stdin,
            subprocess.Popen(
                list(cmd),
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
        for cmd, stdin in cmds
    ]
    errors = []
    for cmd, stdin, proc in procs:
        _out, err = proc.communicate(stdin, timeout=timeout)
        if proc.returncode != 0:
            errors.append(f"command failed (rc={proc.returncode}): {' '.join(cmd)}\n{err.strip()}")
    if errors:
        raise LabError("\n".join(errors))


def list_netns() -> list[str]:
    """Names from ``ip netns list`` (read-only on the host)."""
    out = run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def delete_netns(names: Iterable[str]) -> None:
    """Delete namespaces, ignoring ones already gone."""
    lines = "".join(f"netns del {n}\n" for n in names)
    if lines:
        run(["ip", "-force", "-batch", "-"], input=lines, check=False)


def kernel_problem() -> str | None:
    """Why kernel tests cannot run here, or None if they can.

    Checks cheap prerequisites, then really creates a namespace with a veth
    pair and runs nft in it, since containers often have the binaries but
    lack the capabilities."""
    if not sys.platform.startswith("linux"):
        return f"kernel tests need Linux (platform is {sys.platform})"
    if os.geteuid() != 0:
        return "kernel tests need root (network namespaces, nft)"
    for tool in ("ip", "nft", "conntrack"):
        if shutil.which(tool) is None:
            return f"kernel tests need `{tool}` on PATH (Debian: iproute2, nftables, conntrack)"
    name = f"svk{os.getpid()}-{secrets.token_hex(2)}-probe"
    try:
        try:
            run(["ip", "netns", "add", name], timeout=10)
        except (LabError, subprocess.SubprocessError, OSError) as exc:
            return f"cannot create a network namespace: {exc}"
        try:
            veth = ["link", "add", "probe0", "type", "veth", "peer", "name", "probe1"]
            run(["ip", "-n", name, *veth], timeout=10)
            run(["ip", "netns", "exec", name, "nft", "list", "ruleset"], timeout=10)
        except (LabError, subprocess.SubprocessError, OSError) as exc:
            return f"network namespace is not usable for the lab: {exc}"
    finally:
        delete_netns([name])
    return None


def _netns_in_use(names: Iterable[str]) -> set[str]:
    """Named namespaces that some visible process still lives in."""
    inodes: dict[tuple[int, int], str] = {}
    for name in names:
        try:
            st = os.stat(f"/run/netns/{name}")
        except OSError:
            continue
        inodes[(st.st_dev, st.st_ino)] = name
    used: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{pid}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in inodes:
            used.add(inodes[(st.st_dev, st.st_ino)])
    return used


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cleanup(prefix: str, agents: list[_Agent], logdir: str) -> None:
    """Tear-down shared by close() and the GC/exit finalizer; must not reference the Lab."""
    for agent in agents:
        agent.kill()
    agents.clear()
    try:
        delete_netns(n for n in list_netns() if n.startswith(prefix))
    except (LabError, OSError, subprocess.SubprocessError) as exc:
        print(f"svcrules lab: could not delete namespaces {prefix}*: {exc}", file=sys.stderr)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)


class _Agent:
    """One agent.py process in a lab namespace."""

    def __init__(
        self, lab_ns: str, netns: str, role: str, args: Sequence[str], logdir: str
    ) -> None:
        self.ns = lab_ns
        self.role = role
        self.log_path = Path(logdir) / f"{lab_ns}-{role}-{secrets.token_hex(3)}.log"
        self._log: IO[bytes] = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the agent
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, str(AGENT), role, *args],
            # Both roles exit on EOF on stdin, so they die with the lab process.
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            bufsize=0,
            start_new_session=True,  # a Ctrl-C of pytest must not kill agents mid-test
        )
        self._buf = b""
        self.lock = threading.Lock()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def readline(self, deadline: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LabError(f"agent {self.role} in {self.ns} did not answer in time")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                self.proc.wait(timeout=5)
                rc = self.proc.returncode
                raise LabError(f"agent {self.role} in {self.ns} exited (rc={rc}):\n{self.log()}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def request(self, req: dict[str, Any], deadline: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        with self.lock:
            try:
                self.proc.stdin.write((json.dumps(req) + "\n").encode())
            except BrokenPipeError as exc:
                raise LabError(f"agent client in {self.ns} is gone:\n{self.log()}") from exc
            try:
                resp: dict[str, Any] = json.loads(self.readline(deadline))
            except LabError:
                # A late answer would be read as the answer to the next
                # request: this agent is unusable now (the lab respawns it).
                self.kill()
                raise
        if "error" in resp:
            raise LabError(f"agent client in {self.ns} rejected {req}: {resp['error']}")
        return resp

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self._log.close()


class Server:
    """Handle of an extra ``agent.py serve`` started with :meth:`Lab.serve`."""

    def __init__(self, agent: _Agent, name: str, ports: Sequence[int]) -> None:
        self._agent = agent
        self.name = name
        self.ns = agent.ns
        self.ports = tuple(ports)

    def stop(self) -> None:
        self._agent.kill()


class Lab:
    """Build the topology on start()/__enter__, tear it all down on close().

    A Lab is meant to be shared by many tests (see conftest): reset() brings
    the node back to "no ruleset, no conntrack entries" between tests."""

    def __init__(self, pods: int = 4, ports: Sequence[int] = DEFAULT_PORTS) -> None:
        if not 1 <= pods <= 200:
            raise ValueError("pods must be between 1 and 200")
        self.pod_count = pods
        self.ports = tuple(ports)
        self.prefix = f"svk{os.getpid()}-{secrets.token_hex(2)}-"
        self.pod_names = [f"pod{i}" for i in range(1, pods + 1)]
        self.dummy_kind = "dummy"
        self.startup_seconds = 0.0
        self._agents: list[_Agent] = []
        self._clients: dict[str, _Agent] = {}
        self._servers: list[_Agent] = []
        self._logdir = tempfile.mkdtemp(prefix=self.prefix)
        self._started = False
        self._closed = False
        self._finalizer = weakref.finalize(self, _cleanup, self.prefix, self._agents, self._logdir)

    # ------------------------------------------------------------------ names

    @property
    def members(self) -> list[str]:
        """Short names of all lab namespaces."""
        return ["node", "client", *self.pod_names]

    def netns(self, ns: str) -> str:
        """Full namespace name of a lab member ("node", "client", "podI")."""
        if ns not in self.members:
            raise KeyError(f"unknown lab namespace {ns!r}; have {self.members}")
        return self.prefix + ns

    def _pod_index(self, pod: str) -> int:
        if pod not in self.pod_names:
            raise KeyError(f"unknown pod {pod!r}; have {self.pod_names}")
        return int(pod[3:])

    # -------------------------------------------------------------- addresses

    node_ip4 = NODE_IP4
    node_ip6 = NODE_IP6
    node_dummy_ip4 = NODE_DUMMY_IP4
    node_dummy_ip6 = NODE_DUMMY_IP6
    client_ip4 = CLIENT_IP4
    client_ip6 = CLIENT_IP6
    pod_cidr4 = POD_CIDR4
    pod_cidr6 = POD_CIDR6
    service_cidr4 = SERVICE_CIDR4
    service_cidr6 = SERVICE_CIDR6

    def pod_ip4(self, pod: str) -> str:
        return f"198.51.100.{10 + self._pod_index(pod)}"

    def pod_ip6(self, pod: str) -> str:
        # The decimal digits are used as the last hex group so that pod1 is
        # 198.51.100.11 and 2001:db8:2::11 - easy to match by eye.
        return f"2001:db8:2::{10 + self._pod_index(pod)}"

    def ip(self, ns: str, family: int = 4) -> str:
        """Primary address of a lab member for family 4 or 6."""
        if ns == "node":
            return self.node_ip4 if family == 4 else self.node_ip6
        if ns == "client":
            return self.client_ip4 if family == 4 else self.client_ip6
        return self.pod_ip4(ns) if family == 4 else self.pod_ip6(ns)

    # --------------------------------------------------------------- lifecycle

    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> Lab:
        """Build everything; on any failure tear down what was built and re-raise."""
        if self._started:
            return self
        self._started = True
        t0 = time.monotonic()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def close(self) -> None:
        """Kill agents and delete every namespace with our prefix; idempotent."""
        self._closed = True
        self._clients.clear()
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self._closed

    def _build(self) -> None:
        run(
            ["ip", "-batch", "-"],
            input="".join(f"netns add {self.netns(m)}\n" for m in self.members),
        )

        sysctl_cmds: list[tuple[Sequence[str], str | None]] = []
        for m in self.members:
            extra = _NODE_SYSCTLS if m == "node" else ()
            sysctl_cmds.append((self._in(m, "sysctl", "-q", "-w", *_COMMON_SYSCTLS, *extra), None))
            sysctl_cmds.append((self._in(m, "sysctl", "-q", "-e", "-w", *_OPTIONAL_SYSCTLS), None))
        run_parallel(sysctl_cmds)

        # dummy0 is a "dummy" device; kernels without CONFIG_DUMMY get an ifb
        # device instead, which behaves the same here (NOARP, drops what is
        # sent to it).
        node_ip = ["ip", "-n", self.netns("node")]
        if run([*node_ip, "link", "add", "dummy0", "type", "dummy"], check=False).returncode:
            self.dummy_kind = "ifb"
            run([*node_ip, "link", "add", "dummy0", "type", "ifb"])

        run(["ip", "-n", self.netns("node"), "-batch", "-"], input=self._node_batch())
        batches: list[tuple[Sequence[str], str | None]] = [
            (["ip", "-n", self.netns("client"), "-batch", "-"], self._client_batch())
        ]
        batches += [
            (["ip", "-n", self.netns(p), "-batch", "-"], self._pod_batch(p)) for p in self.pod_names
        ]
        run_parallel(batches)

        ports = ",".join(str(p) for p in self.ports)
        servers = self._servers = [self._spawn_server(p, p, ports) for p in self.pod_names]
        for m in ["client", "node", *self.pod_names]:
            self._clients[m] = self._spawn(m, "client", [])
        deadline = time.monotonic() + 20
        for agent in servers:
            self._wait_ready(agent, deadline)
        for agent in self._clients.values():
            self._ping(agent, deadline)

    @staticmethod
    def _ping(agent: _Agent, deadline: float) -> None:
        """A request for zero connections: proves the client agent is up."""
        agent.request({"dst": "127.0.0.1", "port": 9, "count": 0}, deadline)

    def _client(self, ns: str) -> _Agent:
        """The client agent of ``ns``, respawned if it died (or was killed
        after a request timed out) so one bad probe cannot break later tests."""
        if ns not in self._clients:
            raise KeyError(f"no client agent in {ns!r}; have {sorted(self._clients)}")
        agent = self._clients[ns]
        if not agent.alive():
            agent.kill()
            agent = self._clients[ns] = self._spawn(ns, "client", [])
            self._ping(agent, time.monotonic() + 10)
        return agent

    def _in(self, ns: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns(ns), *cmd]

    @staticmethod
    def _pod_macs(index: int) -> tuple[str, str]:
        hi, lo = divmod(index, 256)
        return f"02:00:01:00:{hi:02x}:{lo:02x}", f"02:00:02:00:{hi:02x}:{lo:02x}"

    def _node_batch(self) -> str:
        lines = [
            "link set lo up",
            f"link add eth0 address {NODE_MAC} type veth peer name eth0 address {CLIENT_MAC}"
            f" netns {self.netns('client')}",
            "link set eth0 up",
            f"addr add {NODE_IP4}/24 dev eth0",
            f"addr add {NODE_IP6}/64 dev eth0 nodad",
            f"neigh replace {CLIENT_IP4} lladdr {CLIENT_MAC} dev eth0 nud permanent",
            f"neigh replace {CLIENT_IP6} lladdr {CLIENT_MAC} dev eth0 nud permanent",
            "link set dummy0 up",
            f"addr add {NODE_DUMMY_IP4}/32 dev dummy0",
            f"addr add {NODE_DUMMY_IP6}/128 dev dummy0 nodad",
            # Service ranges are "routed" into dummy0 (where undnatted packets
            # die) so that node-originated connections pass the nat output
            # hook; src = node IP, as a real node's default route would give.
            f"route add {SERVICE_CIDR4} dev dummy0 src {NODE_IP4}",
            f"route add {SERVICE_CIDR6} dev dummy0 src {NODE_IP6}",
        ]
        for pod in self.pod_names:
            i = self._pod_index(pod)
            node_mac, pod_mac = self._pod_macs(i)
            dev = f"v{pod}"
            lines += [
                f"link add {dev} address {node_mac} type veth peer name eth0 address {pod_mac}"
                f" netns {self.netns(pod)}",
                f"link set {dev} up",
                f"addr add {POD_GW6}/64 dev {dev} nodad",
                f"route add {self.pod_ip4(pod)}/32 dev {dev} src {NODE_IP4}",
                f"route add {self.pod_ip6(pod)}/128 dev {dev} src {NODE_IP6}",
                f"neigh replace {self.pod_ip4(pod)} lladdr {pod_mac} dev {dev} nud permanent",
                f"neigh replace {self.pod_ip6(pod)} lladdr {pod_mac} dev {dev} nud permanent",
            ]
        return "".join(line + "\n" for line in lines)

    def _client_batch(self) -> str:
        lines = [
            "link set lo up",
            "link set eth0 up",
            f"addr add {CLIENT_IP4}/24 dev eth0",
            f"addr add {CLIENT_IP6}/64 dev eth0 nodad",
            f"neigh replace {NODE_IP4} lladdr {NODE_MAC} dev eth0 nud permanent",
            f"neigh replace {NODE_IP6} lladdr {NODE_MAC} dev eth0 nud permanent",
            f"route add default via {NODE_IP4} dev eth0",
            f"route add default via {NODE_IP6} dev eth0",
        ]
        return "".join(line + "\n" for line in lines)

    def _pod_batch(self, pod: str) -> str:
        node_mac, _pod_mac = self._pod_macs(self._pod_index(pod))
        lines = [
            "link set lo up",
            "link set eth0 up",
            f"addr add {self.pod_ip4(pod)}/32 dev eth0",
            f"addr add {self.pod_ip6(pod)}/128 dev eth0 nodad",
            f"neigh replace {POD_GW4} lladdr {node_mac} dev eth0 nud permanent",
            f"neigh replace {POD_GW6} lladdr {node_mac} dev eth0 nud permanent",
            f"route add default via {POD_GW4} dev eth0 onlink",
            f"route add default via {POD_GW6} dev eth0",
        ]
        return "".join(line + "\n" for line in lines)

    def _spawn(self, ns: str, role: str, args: Sequence[str]) -> _Agent:
        agent = _Agent(ns, self.netns(ns), role, args, self._logdir)
        self._agents.append(agent)
        return agent

    def _spawn_server(self, ns: str, name: str, ports: str) -> _Agent:
        return self._spawn(ns, "serve", ["--name", name, "--ports", ports, "--watch-stdin"])

    @staticmethod
    def _wait_ready(agent: _Agent, deadline: float) -> None:
        line = agent.readline(deadline)
        if line.strip() != b"ready":
            raise LabError(f"agent {agent.role} in {agent.ns} said {line!r}:\n{agent.log()}")

    # ----------------------------------------------------------------- actions

    def _check_open(self) -> None:
        if not self._started or self._closed:
            raise LabError("lab is not running (use start() or a with-block)")

    def exec(
        self,
        ns: str,
        *cmd: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 30.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run any command inside a lab namespace."""
        self._check_open()
        return run(self._in(ns, *cmd), input=input, check=check, timeout=timeout)

    def nft(self, *args: str) -> str:
        """Run nft in the node namespace; return stdout."""
        return self.exec("node", "nft", *args).stdout

    def load(self, nft_text: str) -> None:
        """Load a ruleset into the node with ``nft -f -`` (atomic, like the real thing)."""
        proc = self.exec("node", "nft", "-f", "-", input=nft_text, check=False)
        if proc.returncode != 0:
            raise LabError(f"nft -f - failed (rc={proc.returncode}):\n{proc.stderr.strip()}")

    def reset(self) -> None:
        """Empty the node's ruleset and conntrack table so tests are independent."""
        self.nft("flush", "ruleset")
        self.exec("node", "conntrack", "-F")
        for ns in self._clients:
            self._client(ns)
        dead = [a.ns for a in self._servers if not a.alive()]
        if dead:
            raise LabError(f"lab servers died in {', '.join(dead)}")

    def serve(
        self, ns: str, name: str | None = None, ports: Sequence[int] = DEFAULT_PORTS
    ) -> Server:
        """Start an extra server (e.g. on the node for host-network endpoints,
        or on the client as an outside backend). Stopped by close() at the latest."""
        self._check_open()
        name = name or ns
        agent = self._spawn_server(ns, name, ",".join(str(p) for p in ports))
        try:
            self._wait_ready(agent, time.monotonic() + 10)
        except LabError:
            agent.kill()
            raise
        return Server(agent, name, ports)

    def probe(
        self,
        src: str,
        dst: str,
        port: int,
        proto: str = "tcp",
        count: int = 20,
        timeout: float = 1.0,
        *,
        bind: str | None = None,
        sport: int | None = None,
        concurrency: int = 1,
    ) -> list[Result]:
        """Make ``count`` new connections from lab member ``src`` to dst:port.

        ``bind`` / ``sport`` fix the source address / port (default: the
        kernel's source address and a never-recently-used port); with
        ``concurrency`` > 1 attempts run in parallel, which keeps probes that
        expect timeouts short."""
        self._check_open()
        if proto not in ("tcp", "udp"):
            raise ValueError(f"proto must be tcp or udp, not {proto!r}")
        req = {
            "dst": dst,
            "port": port,
            "proto": proto,
            "count": count,
            "timeout": timeout,
            "src": bind,
            "sport": sport,
            "concurrency": concurrency,
        }
        rounds = -(-count // max(1, concurrency))
        deadline = time.monotonic() + rounds * (timeout + 1.0) + 10.0
        resp = self._client(src).request(req, deadline)
        return [Result(**r) for r in resp["results"]]

    # ----------------------------------------------------------------- helpers

    @staticmethod
    def backends(results: Iterable[Result]) -> set[str]:
        """Names of the backends that answered."""
        return {r.backend for r in results if r.outcome == "ok" and r.backend is not None}

    @staticmethod
    def backend_counts(results: Iterable[Result]) -> Counter[str]:
        """How often each backend answered (for distribution checks)."""
        return Counter(r.backend for r in results if r.outcome == "ok" and r.backend is not None)

    @staticmethod
    def outcomes(results: Iterable[Result]) -> Counter[str]:
        return Counter(r.outcome for r in results)

    @staticmethod
    def cleanup_stale() -> list[str]:
        """Delete lab namespaces left by killed runs; return their names.

        Stale means: the pid in the prefix is gone and no visible process is
        inside the namespace (agents exit on EOF when their lab dies). The
        second condition protects a live run in another PID namespace that
        shares /run/netns."""
        dead = [
            n for n in list_netns() if (m := _STALE_RE.match(n)) and not _pid_alive(int(m.group(1)))
        ]
        stale = sorted(set(dead) - _netns_in_use(dead))
        delete_netns(stale)
        for logdir in Path(tempfile.gettempdir()).glob("svk*-*-*"):
            m = _STALE_RE.match(logdir.name)
            if m and logdir.is_dir() and not _pid_alive(int(m.group(1))):
                shutil.rmtree(logdir, ignore_errors=True)
        return stale
