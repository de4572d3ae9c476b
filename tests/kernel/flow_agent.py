#!/usr/bin/env python3
"""Bulk flows and long-lived connections for the load-balancing tests; runs inside a lab
network namespace (``ip netns exec NS python3 flow_agent.py ...``), stdlib only, like
agent.py.

Roles:

``udp DST PORT LOW HIGH [SRC ...]``
    One datagram to DST:PORT from every source port LOW..HIGH (one socket each, closed
    at once), from each source address SRC (default: the one the route gives):
    thousands of new flows in a fraction of a second, whose endpoint the node's
    conntrack table then tells (no answer is awaited). Prints the number sent.

``echo PORT NAME``
    A TCP server: every connection is greeted with ``NAME``, then every line it sends
    comes back as ``NAME LINE``. Prints ``ready``; exits at EOF on stdin.

``hold DST PORT NAME TRIES``
    Open TCP connections to DST:PORT until one is greeted by ``NAME`` (at most TRIES),
    keep that one and print ``held SPORT``; then send every line read on stdin through
    it and print what comes back (``error ...`` when nothing does). Exits at EOF.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import struct
import sys
import threading


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def udp(dst: str, port: int, low: int, high: int, sources: list[str]) -> None:
    family = _family(dst)
    sources = sources or ["::" if family == socket.AF_INET6 else "0.0.0.0"]
    sent = 0
    for src in sources:
        for sport in range(low, high + 1):
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((src, sport))
                s.sendto(b"flow\n", (dst, port))
                sent += 1
    print(sent, flush=True)


def _readline(conn: socket.socket, buf: bytearray) -> bytes | None:
    while b"\n" not in buf:
        chunk = conn.recv(4096)
        if not chunk:
            return None
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line


def _echo_one(conn: socket.socket, name: str) -> None:
    with conn:
        conn.sendall(f"{name}\n".encode())
        buf = bytearray()
        with contextlib.suppress(OSError):
            while (line := _readline(conn, buf)) is not None:
                conn.sendall(f"{name} {line.decode(errors='replace')}\n".encode())


def echo(port: int, name: str) -> None:
    listeners = []
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        s.listen(128)
        listeners.append(s)
    sel = selectors.DefaultSelector()
    for s in listeners:
        sel.register(s, selectors.EVENT_READ)
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _events in sel.select():
            if key.fileobj == sys.stdin.fileno():
                if not os.read(sys.stdin.fileno(), 4096):
                    return
                continue
            assert isinstance(key.fileobj, socket.socket)
            conn, _peer = key.fileobj.accept()
            conn.settimeout(5.0)
            threading.Thread(target=_echo_one, args=(conn, name), daemon=True).start()


def hold(dst: str, port: int, name: str, tries: int) -> None:
    held: socket.socket | None = None
    greeted: list[str] = []
    for _ in range(tries):
        s = socket.create_connection((dst, port), timeout=2.0)
        buf = bytearray()
        greeting = (_readline(s, buf) or b"").decode(errors="replace")
        if greeting == name:
            held = s
            break
        greeted.append(greeting)
        # A reset: no TIME_WAIT left behind on either side.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    if held is None:
        print(f"error: {tries} connections, none greeted by {name}: {greeted[:8]}", flush=True)
        return
    print(f"held {held.getsockname()[1]}", flush=True)
    buf = bytearray()
    for line in sys.stdin:
        try:
            held.sendall(line.encode())
            answer = _readline(held, buf)
            print("error: connection closed" if answer is None else answer.decode(), flush=True)
        except OSError as exc:
            print(f"error: {type(exc).__name__}: {exc}", flush=True)
    held.close()


def main(argv: list[str]) -> None:
    role, *args = argv
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        if role == "udp":
            udp(args[0], int(args[1]), int(args[2]), int(args[3]), args[4:])
        elif role == "echo":
            echo(int(args[0]), args[1])
        elif role == "hold":
            hold(args[0], int(args[1]), args[2], int(args[3]))
        else:
            raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
