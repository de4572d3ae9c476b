"""The listeners of ``svcrules serve``: one for /healthz, /livez and /metrics, and one
per healthCheckNodePort (and family) of the rules in place; health.py decides every
answer.

One thread waits on every listening socket at once (``selectors``) and checks the state
directory once a ``poll`` (a stat of two files; the summary is read again only when the
state file changed). Each connection is answered in a thread of its own, at most
``MAX_CONNECTIONS`` at a time (more are closed at once), with a timeout, so that a slow
client holds one thread for at most ``timeout`` seconds. HTTP/1.1 with keep-alive, as
Go's server that kube-proxy uses.

Listeners follow the state: a healthCheckNodePort that appears is opened, one that goes
is closed, as kube-proxy's ``SyncServices`` does. A port that cannot be opened (another
program holds it, the node's address is not configured) is logged once and tried again
every ``retry`` seconds, as kube-proxy tries again on every sync.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, cast

from svcrules.errors import ListenError
from svcrules.kernel.health import Answer, Health, ServiceHealth, boot_time, make_view, read_summary
from svcrules.kernel.state import Meta, StateStore

LOG = logging.getLogger("svcrules")

MAX_CONNECTIONS = 64

Bind = tuple[int, str, int]  # family, address ("": every address of the family), port


def parse_bind(text: str) -> Bind:
    """``HOST:PORT`` or ``[IPV6]:PORT``, as kube-proxy's --healthz-bind-address; raise
    ValueError. ``[::]`` is every address of both families, as Go listens on it."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (for example 0.0.0.0:10256 or [::]:10256)")
    if host.startswith("[") and host.endswith("]"):
        host, family = host[1:-1], 6
    else:
        family = 4
    try:
        packed = socket.inet_pton(socket.AF_INET if family == 4 else socket.AF_INET6, host)
    except OSError:
        raise ValueError(f"{text!r}: {host!r} is not an IPv{family} address") from None
    wildcard = packed == bytes(len(packed))
    return family, "" if wildcard else host, int(port_text)


def show(bind: Bind) -> str:
    family, address, port = bind
    if family == 4:
        return f"{address or '0.0.0.0'}:{port}"
    return f"[{address or '::'}]:{port}"


def listen(bind: Bind, dual_stack: bool = False) -> socket.socket:
    """A listening, non-blocking TCP socket (SO_REUSEADDR, as Go's listeners); an IPv6
    wildcard serves IPv6 only unless ``dual_stack``."""
    family, address, port = bind
    sock = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == 6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        sock.bind((address or ("0.0.0.0" if family == 4 else "::"), port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class Listener:
    """One listening socket and where its answers come from."""

    bind: Bind
    sock: socket.socket
    answer: Callable[[str], Answer]
    service: ServiceHealth | None = None  # a healthCheckNodePort's Service

    def port(self) -> int:
        return int(self.sock.getsockname()[1])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10.0  # a connection idle (or slow) this long is closed

    def do_GET(self) -> None:
        self._send(body=True)

    def do_HEAD(self) -> None:
        self._send(body=False)

    def send_response(self, code: int, message: str | None = None) -> None:
        """As Go's server: a Date header, no Server header."""
        self.log_request(code)
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())

    def _send(self, body: bool) -> None:
        answer = cast(Listener, self.server).answer(self.path)
        self.send_response(answer.status)
        for name, value in answer.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        if body:
            self.wfile.write(answer.body)

    def log_message(self, format: str, *args: Any) -> None:
        """Probes come every few seconds from every load balancer: not logged."""


@dataclass
class Server:
    """``svcrules serve``: ``start``, then ``run`` until ``stop``."""

    health: Health
    store: StateStore
    healthz: Bind | None  # None: no /healthz listener
    poll: float = 1.0
    retry: float = 5.0
    booted: float = field(default_factory=boot_time)
    listeners: dict[Bind, Listener] = field(default_factory=dict)  # healthCheckNodePorts
    healthz_listener: Listener | None = None

    def __post_init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._threads: set[threading.Thread] = set()
        self._seen: tuple[object, ...] = ()
        self._summary: tuple[Meta | None, str] = (None, "")
        self._failed: dict[Bind, str] = {}  # port -> why it could not be opened
        self._retry_at = 0.0
        self._claimed: set[Bind] = set()  # ports two Services named (logged once)
        self._lock = threading.Lock()

    # Starting and stopping

    def start(self) -> None:
        """Listen on the /healthz address (ListenError when it cannot), then read the
        state directory and open its healthCheckNodePorts."""
        if self.healthz is not None:
            try:
                sock = listen(self.healthz, dual_stack=True)
            except OSError as exc:
                raise ListenError(
                    f"cannot listen on {show(self.healthz)} (--healthz-bind-address): "
                    f"{exc.strerror or exc}"
                ) from None
            self.healthz_listener = Listener(self.healthz, sock, self.health.for_path)
            self._selector.register(sock, selectors.EVENT_READ, self.healthz_listener)
        self.refresh()

    def stop(self) -> None:
        """Make ``run`` return (safe from a signal handler or another thread)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def run(self) -> None:
        """Answer and follow the state directory until ``stop``; then close everything."""
        next_poll = time.monotonic() + self.poll
        try:
            while not self._stopping:
                left = next_poll - time.monotonic()
                if left <= 0:
                    self.refresh()
                    next_poll = time.monotonic() + self.poll
                    continue
                for key, _ in self._selector.select(timeout=left):
                    if key.data is None:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(64)
                    elif not self._stopping:
                        self._accept(cast(Listener, key.data))
        finally:
            self.close()

    def close(self, wait: float = 2.0) -> None:
        """Close every listener; give answers under way ``wait`` seconds to finish."""
        for listener in [*self.listeners.values(), self.healthz_listener]:
            if listener is not None:
                self._close(listener)
        self.listeners.clear()
        self.healthz_listener = None
        deadline = time.monotonic() + wait
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        for sock in (self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()

    # The state directory

    def _stat(self) -> tuple[object, ...]:
        out: list[object] = []
        for path in (self.store.path, self.store.counters_path):
            try:
                st = os.stat(path)
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def refresh(self) -> None:
        """Read the state directory again if it changed; open and close listeners (also
        safe from another thread than ``run``'s)."""
        with self._lock:
            self._refresh()

    def _refresh(self) -> None:
        seen = self._stat()
        if seen != self._seen:
            if not self._seen or seen[0] != self._seen[0]:
                summary = read_summary(self.store, self.booted)
                if summary[1] and summary[1] != self._summary[1]:
                    LOG.info("%s", summary[1], extra={"fields": {"event": "state"}})
                self._summary = summary
            self._seen = seen
            view = make_view(*self._summary, self.store.load_counters(), self.booted)
            self.health.view = view
            self._follow(view.services)
        elif self._failed and time.monotonic() >= self._retry_at:
            self._follow(self.health.view.services)

    def _follow(self, services: tuple[ServiceHealth, ...]) -> None:
        """Open the healthCheckNodePorts of ``services``, close the others."""
        wanted: dict[Bind, ServiceHealth] = {}
        for svc in services:
            other = wanted.setdefault(svc.bind, svc)
            if other is not svc and svc.bind not in self._claimed:
                self._claimed.add(svc.bind)
                LOG.warning(
                    "healthCheckNodePort %s of %s/%s is %s/%s's too: answered for %s/%s",
                    show(svc.bind),
                    svc.namespace,
                    svc.name,
                    other.namespace,
                    other.name,
                    other.namespace,
                    other.name,
                )
        for bind, listener in list(self.listeners.items()):
            if bind not in wanted:
                self._close(listener)
                del self.listeners[bind]
                self._log_port("closed", listener.service)
            else:
                listener.service = wanted[bind]
        self._failed = {b: why for b, why in self._failed.items() if b in wanted}
        for bind, svc in wanted.items():
            if bind not in self.listeners:
                self._open(bind, svc)
        self._retry_at = time.monotonic() + self.retry

    def _open(self, bind: Bind, svc: ServiceHealth) -> None:
        try:
            sock = listen(bind)
        except OSError as exc:
            why = str(exc.strerror or exc)
            if self._failed.get(bind) != why:
                LOG.error(
                    "cannot listen on %s for healthCheckNodePort of %s/%s: %s (trying again)",
                    show(bind),
                    svc.namespace,
                    svc.name,
                    why,
                    extra={"fields": {"event": "failed"}},
                )
            self._failed[bind] = why
            return
        self._failed.pop(bind, None)
        listener = Listener(bind, sock, lambda _path: Answer(503, (), b""), svc)
        listener.answer = self._service_answer(listener)
        self.listeners[bind] = listener
        self._selector.register(sock, selectors.EVENT_READ, listener)
        self._log_port("open", svc)

    def _service_answer(self, listener: Listener) -> Callable[[str], Answer]:
        def answer(_path: str) -> Answer:
            svc = listener.service
            assert svc is not None
            return self.health.for_service(svc.namespace, svc.name, svc.family)

        return answer

    @staticmethod
    def _log_port(what: str, svc: ServiceHealth | None) -> None:
        if svc is None:
            return
        LOG.info(
            "healthCheckNodePort %s %s for %s/%s (%d local endpoints)",
            show(svc.bind),
            what,
            svc.namespace,
            svc.name,
            svc.local_endpoints,
            extra={"fields": {"event": f"port-{what}", "port": svc.port, "family": svc.family}},
        )

    def _close(self, listener: Listener) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(listener.sock)
        listener.sock.close()

    # Answering

    def _accept(self, listener: Listener) -> None:
        try:
            conn, addr = listener.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            LOG.warning("accept on %s failed: %s", show(listener.bind), exc.strerror or exc)
            return
        if not self._slots.acquire(blocking=False):
            conn.close()  # too many at once: the client tries again
            return
        conn.setblocking(True)
        thread = threading.Thread(target=self._answer, args=(conn, addr, listener), daemon=True)
        self._threads.add(thread)
        thread.start()

    def _answer(self, conn: socket.socket, addr: Any, listener: Listener) -> None:
        try:
            _Handler(conn, addr, cast(Any, listener))
        except OSError:
            pass  # the client went away
        finally:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)
            conn.close()
            self._slots.release()
            self._threads.discard(threading.current_thread())
