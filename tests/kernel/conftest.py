"""Fixtures for kernel tests: a real nftables ruleset in throw-away namespaces.

Scope: one :class:`Lab` per test session (``kernel_lab``), because building
it costs a few hundred milliseconds plus ~10 agent processes, while returning
to a clean state is cheap: the function-scoped ``lab`` fixture calls
``Lab.reset()`` (flush the node's ruleset and conntrack table) before every
test.  Tests that change the topology itself (routes, links, sysctls) must not
use the shared lab; they use ``lab_factory`` to get a private one.

Without root / ip / nft / conntrack / working network namespaces the tests are
skipped, or fail when ``SVCRULES_REQUIRE_KERNEL=1`` (set it in CI so that a
broken environment cannot pass silently).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

import pytest

from .lab import DEFAULT_PORTS, Lab, kernel_problem

KERNEL_DIR = Path(__file__).resolve().parent
REQUIRE_ENV = "SVCRULES_REQUIRE_KERNEL"

_skip_reasons: list[str] = []


@functools.lru_cache(maxsize=1)
def _cached_problem() -> str | None:
    return kernel_problem()


def require_kernel() -> None:
    """Skip (or, with SVCRULES_REQUIRE_KERNEL=1, fail) unless the lab can run here."""
    problem = _cached_problem()
    if problem is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {problem}", pytrace=False)
    if problem not in _skip_reasons:
        _skip_reasons.append(problem)
    pytest.skip(f"kernel tests skipped: {problem}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kernel: needs root, ip, nft, conntrack and network namespaces (tests/kernel)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items, so only mark our own.
    for item in items:
        if KERNEL_DIR in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.kernel)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # Skip reasons are hidden without -rs; say it plainly once.
    for reason in _skip_reasons:
        terminalreporter.write_line(f"kernel tests skipped: {reason}", yellow=True)
    # How much the trace differential test compared (only if it ran).
    observe = sys.modules.get(f"{__package__}.observe")
    checked: Counter[tuple[str, str]] = Counter(getattr(observe, "CHECKED", {}))
    for backend in sorted({b for b, _verdict in checked}):
        verdicts = {v: n for (b, v), n in sorted(checked.items()) if b == backend}
        detail = ", ".join(f"{v} {n}" for v, n in verdicts.items())
        picks = Counter(getattr(observe, "PICKS", {}))
        dnat = ", ".join(f"{k} {n}" for (b, k), n in sorted(picks.items()) if b == backend)
        terminalreporter.write_line(
            f"trace differential: {sum(verdicts.values())} (cluster, packet) pairs checked"
            f" on {backend} ({detail})" + (f"; of the dnat ones: {dnat}" if dnat else "")
        )
    # What the load-balancing tests measured (only if they ran).
    flows = sys.modules.get(f"{__package__}.flows")
    for line in getattr(flows, "FIGURES", []):
        terminalreporter.write_line(f"load balancing: {line}")


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def kernel_lab() -> Iterator[Lab]:
    """The shared lab; prefer ``lab``, which also resets it."""
    require_kernel()
    Lab.cleanup_stale()  # namespaces of runs that were SIGKILLed / SIGTERMed
    # A SIGTERM (e.g. a CI timeout) would otherwise skip every teardown and
    # leave the namespaces behind; turn it into a KeyboardInterrupt.
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with Lab() as lab:
            yield lab
    finally:
        if previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture
def lab(kernel_lab: Lab) -> Lab:
    """The shared lab with an empty ruleset and conntrack table."""
    kernel_lab.reset()
    return kernel_lab


@pytest.fixture
def lab_factory() -> Iterator[Callable[..., Lab]]:
    """Private labs for tests that modify the topology; closed at teardown."""
    require_kernel()
    made: list[Lab] = []

    def make(pods: int = 1, ports: Sequence[int] = DEFAULT_PORTS) -> Lab:
        lab = Lab(pods=pods, ports=ports)
        made.append(lab)
        return lab.start()

    yield make
    for lab in made:
        lab.close()
