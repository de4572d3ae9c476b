"""The renderers, by backend name: what ``Ruleset.text(backend)`` returns, and the
other forms a backend can print (``compile -o json``, ``compile --family``).

The kernel side of each backend (its driver and fake) is registered in
svcrules/kernel/registry.py under the same name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from svcrules.plan.node import NodePlan
from svcrules.render.golden import normalize
from svcrules.render.iptables.layout import (
    family_section,
    render_iptables,
    render_iptables_golden,
    unsupported,
)
from svcrules.render.nftables.json_form import render_json
from svcrules.render.nftables.layout import render_nft, render_nft_golden


@dataclass(frozen=True)
class Renderer:
    text: Callable[[NodePlan], str]  # what the backend loads
    # The same ruleset as JSON (nftables: the libnftables form), if the backend has one.
    json: Callable[[NodePlan], str] | None = None
    # One family's part of the text ("ipv4", "ipv6"), where the text holds one per family.
    family_section: Callable[[str, str], str] | None = None
    # The text as a golden file keeps it (svcrules.render.golden); None: the text with
    # its volatile parts normalized.
    golden: Callable[[NodePlan], str] | None = None
    # (Service, why) for each Service (namespace/name) whose plan this backend cannot
    # spell: ``text`` refuses the plan while any is in it (``on_invalid="skip"`` leaves
    # them out instead, svcrules.compiler.leave_out_unsupported).
    unsupported: Callable[[NodePlan], list[tuple[str, str]]] | None = None

    def golden_text(self, plan: NodePlan, text: str) -> str:
        """The golden form of ``text``, the backend's text of ``plan``."""
        return self.golden(plan) if self.golden is not None else normalize(text)


RENDERERS: dict[str, Renderer] = {
    "nftables": Renderer(render_nft, json=render_json, golden=render_nft_golden),
    "iptables": Renderer(
        render_iptables,
        family_section=family_section,
        golden=render_iptables_golden,
        unsupported=unsupported,
    ),
}
