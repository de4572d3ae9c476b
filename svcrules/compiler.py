"""The library entry point: objects in, ruleset out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TextIO

from svcrules.backends.nftables import render_nft
from svcrules.config import Overrides, node_config
from svcrules.load import Inputs, load_paths
from svcrules.model import NodeConfig
from svcrules.plan import NodePlan
from svcrules.resolve import resolve


@dataclass(frozen=True)
class Ruleset:
    """A compiled ruleset: the plan it came from and its renderings."""

    plan: NodePlan

    @cached_property
    def nft(self) -> str:
        return render_nft(self.plan)

    @cached_property
    def json(self) -> str:
        from svcrules.backends.nftables_json import render_json

        return render_json(self.plan)


def compile(inputs: Inputs, node: NodeConfig) -> Ruleset:
    """Compile loaded objects for one node."""
    return Ruleset(resolve(inputs, node))


def compile_paths(
    paths: Sequence[str],
    config: str | None = None,
    overrides: Overrides | None = None,
    stdin: TextIO | None = None,
) -> Ruleset:
    """Load ``paths`` (and ``config``), find the NodeConfig and compile."""
    inputs = load_paths(paths, stdin=stdin)
    config_inputs = load_paths([config], stdin=stdin) if config else None
    node = node_config(inputs, config_inputs, overrides or Overrides())
    return compile(inputs, node)
