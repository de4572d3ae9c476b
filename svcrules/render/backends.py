"""The renderers, by backend name: what ``Ruleset.text(backend)`` returns, and the
other forms a backend can print (``compile --format json``, ``compile --family``).

The kernel side of each backend (its driver and fake) is registered in
svcrules/kernel/registry.py under the same name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from svcrules.plan.node import NodePlan
from svcrules.render.iptables.layout import family_section, render_iptables
from svcrules.render.nftables.json_form import render_json
from svcrules.render.nftables.layout import render_nft


@dataclass(frozen=True)
class Renderer:
    text: Callable[[NodePlan], str]  # what the backend loads
    # The same ruleset as JSON (nftables: the libnftables form), if the backend has one.
    json: Callable[[NodePlan], str] | None = None
    # One family's part of the text ("ipv4", "ipv6"), where the text holds one per family.
    family_section: Callable[[str, str], str] | None = None


RENDERERS: dict[str, Renderer] = {
    "nftables": Renderer(render_nft, json=render_json),
    "iptables": Renderer(render_iptables, family_section=family_section),
}
