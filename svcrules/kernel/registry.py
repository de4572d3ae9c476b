"""One row per backend: its name, how a driver reaches the kernel, and its fake.

Nothing else in svcrules branches on a backend's name: the reconciler and the CLI ask
this table for a driver, and the driver for everything backend-specific. The text a
backend loads is rendered under the same name (svcrules.render.backends)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from svcrules.errors import UsageError
from svcrules.kernel.iptables.driver import IptablesDriver
from svcrules.kernel.iptables.fake import FakeIptables
from svcrules.kernel.iptables.transport import Iptables
from svcrules.kernel.nft.driver import NftDriver
from svcrules.kernel.nft.fake import FakeNft
from svcrules.kernel.nft.transport import open_backend
from svcrules.kernel.reconcile import Driver


@dataclass(frozen=True)
class Backend:
    name: str
    # The command-line option that chooses its tool (--nft, --iptables).
    option: str
    # The driver over the real kernel interface, given the user's choice of tool
    # ("auto" or a backend-specific one: libnftables, nft; nft, legacy).
    open: Callable[[str], Driver]
    # The driver over the shipped fake of the kernel interface, for tests without
    # root; the argument chooses a variant ("" for the default).
    fake: Callable[[str], tuple[Any, Driver]]


def _fake_nft(variant: str) -> tuple[Any, Driver]:
    kernel = FakeNft()
    return kernel, NftDriver(kernel)


def _fake_iptables(variant: str) -> tuple[Any, Driver]:
    kernel = FakeIptables(variant or "legacy")
    return kernel, IptablesDriver(kernel)


BACKENDS: dict[str, Backend] = {
    "nftables": Backend("nftables", "nft", lambda tool: NftDriver(open_backend(tool)), _fake_nft),
    "iptables": Backend(
        "iptables", "iptables", lambda tool: IptablesDriver(Iptables(tool)), _fake_iptables
    ),
}


def backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise UsageError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}") from None


def open_driver(name: str, tools: dict[str, str], saved_tool: str = "") -> Driver:
    """The named backend's driver over the kernel, with the tool ``tools`` chooses for it
    (by option name); for "auto", the tool that applied the rules (``saved_tool``): the
    variant that applied them is the one that can see them."""
    row = backend(name)
    tool = tools.get(row.option, "auto")
    if tool == "auto" and saved_tool.startswith(f"{name}-"):
        tool = saved_tool.removeprefix(f"{name}-")
    return row.open(tool)


def open_fake(name: str) -> tuple[Any, Driver]:
    """A fake kernel and a driver over it: ``nftables``, ``iptables`` or
    ``iptables-VARIANT`` (legacy, nft)."""
    base, _, variant = name.partition("-")
    return backend(base).fake(variant)
