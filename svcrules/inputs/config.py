"""Find the NodeConfig: from ``--config``, from the inputs, and flag overrides.

Flags override single fields so that a node can be described on the command
line alone (``--node-name`` and ``--node-ip`` are then enough).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from svcrules.errors import InputError, Origin, Problem
from svcrules.inputs.load import Inputs, validation_problems
from svcrules.inputs.model import NodeConfig
from svcrules.inputs.overrides import Overrides

__all__ = ["NEEDED", "Overrides", "node_config"]

NEEDED = (
    "a NodeConfig is needed (svcrules.io/v1alpha1, kind NodeConfig) with at least "
    "metadata.name and spec.nodeIPs; give it with --config FILE, as a document among "
    "the inputs, or with --node-name and --node-ip"
)


def node_config(inputs: Inputs, config: Inputs | None, overrides: Overrides) -> NodeConfig:
    """The one NodeConfig to compile for, with overrides applied."""
    found = list(config.node_configs) if config else []
    origins = config.origins if config else {}
    if not found:
        found = list(inputs.node_configs)
        origins = inputs.origins
    if len(found) > 1:
        raise InputError(
            [
                Problem(origins.get(id(nc)), "", "more than one NodeConfig given; keep one")
                for nc in found
            ]
        )
    base: dict[str, Any] = {
        "apiVersion": "svcrules.io/v1alpha1",
        "kind": "NodeConfig",
        "metadata": {},
        "spec": {},
    }
    origin = Origin("<flags>", 0, kind="NodeConfig")
    if found:
        base = found[0].model_dump(by_alias=True)
        origin = origins.get(id(found[0]), origin)
    if overrides.node_name:
        base["metadata"]["name"] = overrides.node_name
    base["spec"].update(overrides.spec_fields())
    if not base["metadata"].get("name") and not base["spec"].get("nodeIPs"):
        raise InputError([Problem(None, "", NEEDED)])
    try:
        return NodeConfig.model_validate(base)
    except ValidationError as exc:
        problems = validation_problems(exc, origin, NodeConfig)
        if not found:
            problems.append(Problem(None, "", NEEDED))
        raise InputError(problems) from None
