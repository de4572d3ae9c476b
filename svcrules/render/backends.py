"""The renderers, by backend name: what ``Ruleset.text(backend)`` returns.

The kernel side of each backend (its driver and fake) is registered in
svcrules/kernel/registry.py under the same name."""

from __future__ import annotations

from collections.abc import Callable

from svcrules.plan.node import NodePlan
from svcrules.render.iptables.layout import render_iptables
from svcrules.render.nftables.layout import render_nft

RENDERERS: dict[str, Callable[[NodePlan], str]] = {
    "nftables": render_nft,
    "iptables": render_iptables,
}
