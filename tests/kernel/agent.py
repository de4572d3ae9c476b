#!/usr/bin/env python3
"""Traffic agent for the kernel test lab; runs inside a lab network namespace.

It is a standalone, stdlib-only script because it is started with
``ip netns exec NS python3 agent.py ...`` and must not depend on the project
being importable inside the namespace.

Roles:

``serve --name NAME --ports 8080,8081``
    Listen on every port for TCP and UDP, IPv4 and IPv6, and answer every TCP
    connection / UDP datagram with one line ``NAME PEER_IP LOCAL_PORT``.
    Prints ``ready`` once all sockets are bound.

``client``
    Read JSON requests (one per line) on stdin, answer each with one JSON line
    on stdout.  See :func:`handle_request` for the request format.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import select
import selectors
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# Linux values; Python 3.11's socket module lacks some of them.
IP_PKTINFO: int = getattr(socket, "IP_PKTINFO", 8)
IP_RECVERR: int = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR: int = getattr(socket, "IPV6_RECVERR", 25)
IPV6_RECVPKTINFO: int = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO: int = getattr(socket, "IPV6_PKTINFO", 50)

ANC_BUF = socket.CMSG_SPACE(64)


# --------------------------------------------------------------------------
# serve
# --------------------------------------------------------------------------


def _listeners(ports: list[int]) -> list[tuple[socket.socket, int, str]]:
    """Bind every (family, proto, port); v6 sockets are V6ONLY so that the
    v4 wildcard socket can share the port and peers are never v4-mapped."""
    socks: list[tuple[socket.socket, int, str]] = []
    for port in ports:
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            for kind in ("tcp", "udp"):
                stype = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
                s = socket.socket(family, stype)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if kind == "udp":
                    # Needed to answer from the address the datagram was sent
                    # to (the node has several addresses).
                    if family == socket.AF_INET:
                        s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                    else:
                        s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
                s.bind((host, port))
                if kind == "tcp":
                    s.listen(1024)
                s.setblocking(False)
                socks.append((s, port, kind))
    return socks


def _answer_tcp(lsock: socket.socket, name: str, port: int) -> None:
    """Accept whatever is pending and answer each connection at once."""
    while True:
        try:
            conn, peer = lsock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # e.g. ECONNABORTED: peer gave up already
            print(f"accept error: {exc}", file=sys.stderr, flush=True)
            return
        try:
            conn.settimeout(1.0)
            conn.sendall(f"{name} {peer[0]} {port}\n".encode())
        except OSError as exc:
            print(f"send error to {peer}: {exc}", file=sys.stderr, flush=True)
        finally:
            conn.close()


def _answer_udp(sock: socket.socket, name: str, port: int) -> None:
    """Reply to every queued datagram from the address it was sent to."""
    while True:
        try:
            _data, ancdata, _flags, peer = sock.recvmsg(2048, ANC_BUF)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            print(f"recv error: {exc}", file=sys.stderr, flush=True)
            return
        anc: list[tuple[int, int, bytes]] = []
        for level, ctype, cdata in ancdata:
            if level == socket.IPPROTO_IP and ctype == IP_PKTINFO:
                _ifindex, _spec, dst = struct.unpack("=i4s4s", cdata[:12])
                anc = [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, dst, bytes(4)))]
            elif level == socket.IPPROTO_IPV6 and ctype == IPV6_PKTINFO:
                dst6, _ifindex = struct.unpack("=16si", cdata[:20])
                anc = [(socket.IPPROTO_IPV6, IPV6_PKTINFO, struct.pack("=16si", dst6, 0))]
        line = f"{name} {peer[0]} {port}\n".encode()
        try:
            sock.sendmsg([line], anc, 0, peer)
        except OSError as exc:
            print(f"sendmsg error to {peer}: {exc}", file=sys.stderr, flush=True)


def serve(name: str, ports: list[int], watch_stdin: bool = False) -> None:
    """Single-threaded selector loop: answers are tiny, so no worker threads.

    With ``watch_stdin`` the server exits when stdin reaches EOF, i.e. when
    the lab process that holds the other end of the pipe dies, however it dies."""
    sel = selectors.DefaultSelector()
    for sock, port, kind in _listeners(ports):
        sel.register(sock, selectors.EVENT_READ, (sock, port, kind))
    if watch_stdin:
        sel.register(sys.stdin.fileno(), selectors.EVENT_READ, None)
    print("ready", flush=True)
    while True:
        for key, _events in sel.select():
            if key.data is None:
                if not os.read(sys.stdin.fileno(), 4096):
                    return
                continue
            sock, port, kind = key.data
            if kind == "tcp":
                _answer_tcp(sock, name, port)
            else:
                _answer_udp(sock, name, port)


# --------------------------------------------------------------------------
# client
# --------------------------------------------------------------------------


class PortAllocator:
    """Hands out source ports sequentially so that consecutive probes never
    reuse a 5-tuple: a reused UDP tuple would hit the old conntrack entry and
    stick to the old backend, hiding load-balancing behaviour."""

    LOW, HIGH = 40000, 60999

    def __init__(self) -> None:
        self._next = random.randint(self.LOW, self.HIGH)
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            port = self._next
            self._next = self.LOW if port >= self.HIGH else port + 1
            return port


PORTS = PortAllocator()


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _new_socket(req: dict[str, Any]) -> tuple[socket.socket, int]:
    """Create and bind a socket with a fresh (or the requested) source port."""
    dst: str = req["dst"]
    family = _family(dst)
    stype = socket.SOCK_STREAM if req.get("proto", "tcp") == "tcp" else socket.SOCK_DGRAM
    src: str | None = req.get("src")
    sport: int | None = req.get("sport")
    host = src or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    for _attempt in range(200):
        s = socket.socket(family, stype)
        try:
            # UDP: report ICMP host/net unreachable too, not only port
            # unreachable. TCP: see _tcp_connect.
            if family == socket.AF_INET:
                s.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
            else:
                s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
            if sport is not None:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, sport))
                return s, sport
            port = PORTS.take()
            s.bind((host, port))
            return s, port
        except OSError as exc:
            s.close()
            if exc.errno != errno.EADDRINUSE or sport is not None:
                raise
    raise OSError(errno.EADDRINUSE, "no free source port")


def _queued_errno(sock: socket.socket) -> int:
    """First errno on the socket's error queue (IP_RECVERR), or 0."""
    try:
        _data, ancdata, _flags, _addr = sock.recvmsg(1, 1024, socket.MSG_ERRQUEUE)
    except (BlockingIOError, InterruptedError):
        return 0
    for level, ctype, cdata in ancdata:
        if (level, ctype) in ((socket.IPPROTO_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR)):
            return int(struct.unpack("=I", cdata[:4])[0])
    return 0


def _tcp_connect(sock: socket.socket, addr: tuple[str, int], deadline: float) -> None:
    """Non-blocking connect that also sees ICMP errors the kernel only queues.

    On a veth the ICMP error for a SYN can come back while connect() still
    holds the socket lock; the kernel then only records a "soft" error (seen
    at the SYN retransmit, ~1 s later) and counts LockDroppedIcmps. With
    IP_RECVERR the error is also put on the error queue, which poll() reports
    at once, so a reject is "refused"/"unreachable" right away."""
    sock.setblocking(False)
    rc = sock.connect_ex(addr)
    if rc not in (0, errno.EINPROGRESS, errno.EAGAIN):
        raise OSError(rc, os.strerror(rc))
    poller = select.poll()
    poller.register(sock, select.POLLOUT | select.POLLERR)
    while rc != 0:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out connecting")
        events = poller.poll(max(1, int(left * 1000)))
        if not events:
            continue
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or _queued_errno(sock)
        if err:
            raise OSError(err, os.strerror(err))
        if events[0][1] & select.POLLOUT:
            rc = 0
    sock.settimeout(max(deadline - time.monotonic(), 0.001))


def _classify(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    # EACCES: ICMPv6 administratively prohibited / reject-route / policy-fail.
    unreachable = (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES)
    if isinstance(exc, OSError) and exc.errno in unreachable:
        return "unreachable"
    return "error"


def _parse_answer(raw: bytes) -> tuple[str, str, int]:
    name, peer, port = raw.decode(errors="replace").split()
    return name, peer, int(port)


def probe_once(req: dict[str, Any]) -> dict[str, Any]:
    """Make one new connection (or datagram exchange) and describe it."""
    dst: str = req["dst"]
    port = int(req["port"])
    timeout = float(req.get("timeout", 1.0))
    proto = req.get("proto", "tcp")
    result: dict[str, Any] = {
        "outcome": "error",
        "backend": None,
        "seen_src": None,
        "port": None,
        "sport": None,
        "elapsed": 0.0,
        "detail": "",
    }
    start = time.monotonic()
    deadline = start + timeout
    sock: socket.socket | None = None
    try:
        sock, sport = _new_socket(req)
        result["sport"] = sport
        if proto == "tcp":
            _tcp_connect(sock, (dst, port), deadline)
            buf = b""
            while not buf.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out reading answer")
                sock.settimeout(left)
                chunk = sock.recv(256)
                if not chunk:
                    break
                buf += chunk
        else:
            sock.connect((dst, port))
            try:
                sock.send(b"probe\n")
            except PermissionError:
                # Dropped or rejected by the local ruleset's output hook. A
                # reject queues an ICMP error on the socket, so let recv()
                # tell "refused" (error) from "timeout" (plain drop).
                result["detail"] = "send: EPERM from local netfilter; "
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            buf = sock.recv(2048)
        if not buf.strip():
            result["detail"] = "connection closed without an answer"
        else:
            name, peer, lport = _parse_answer(buf)
            result.update(outcome="ok", backend=name, seen_src=peer, port=lport)
    except Exception as exc:  # every failure is a probe outcome
        result["outcome"] = _classify(exc)
        result["detail"] += f"{type(exc).__name__}: {exc}"
    finally:
        if sock is not None:
            if sock.type == socket.SOCK_STREAM:
                # Close with a reset: neither side keeps the connection in TIME_WAIT.
                # Thousands of probes would otherwise leave masqueraded 4-tuples in
                # TIME_WAIT on the pods, where a later SYN reusing one is dropped
                # (PAWS: per-connection timestamp offsets) and the probe times out.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        result["elapsed"] = round(time.monotonic() - start, 6)
    return result


def handle_request(req: dict[str, Any]) -> dict[str, Any]:
    """Request: ``{"dst", "port", "proto": "tcp"|"udp", "count", "timeout",
    "src": bind address or null, "sport": int or null, "concurrency": int}``.

    Each of the ``count`` attempts is a NEW connection so that the node's
    conntrack sees a new flow (and load balancing decides afresh)."""
    count = int(req.get("count", 1))
    conc = max(1, int(req.get("concurrency", 1)))
    if conc == 1 or count <= 1:
        results = [probe_once(req) for _ in range(count)]
    else:
        with ThreadPoolExecutor(max_workers=min(conc, count)) as pool:
            results = list(pool.map(lambda _i: probe_once(req), range(count)))
    return {"results": results}


def client() -> None:
    """Line-oriented JSON loop; the lab keeps one client per namespace alive."""
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            resp = handle_request(json.loads(line))
        except Exception as exc:  # report bad requests, keep running
            resp = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(resp) + "\n")
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role", required=True)
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("--name", required=True)
    p_serve.add_argument("--ports", required=True, help="comma separated")
    p_serve.add_argument("--watch-stdin", action="store_true", help="exit on EOF on stdin")
    sub.add_parser("client")
    args = parser.parse_args(argv)
    if args.role == "serve":
        ports = [int(p) for p in args.ports.split(",") if p.strip()]
        with contextlib.suppress(KeyboardInterrupt):
            serve(args.name, ports, args.watch_stdin)
    else:
        with contextlib.suppress(KeyboardInterrupt):
            client()


if __name__ == "__main__":
    main()
