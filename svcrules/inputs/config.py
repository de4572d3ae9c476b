"""Find the NodeConfig: from ``--config``, from the inputs, and flag overrides.

Flags override single fields so that a node can be described on the command
line alone (``--node-name`` and ``--node-ip`` are then enough).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from svcrules.errors import InputError, Origin, Problem
from svcrules.inputs.load import Inputs, validation_problems
from svcrules.inputs.model import NodeConfig

NEEDED = (
    "a NodeConfig is needed (svcrules.io/v1alpha1, kind NodeConfig) with at least "
    "metadata.name and spec.nodeIPs; give it with --config FILE, as a document among "
    "the inputs, or with --node-name and --node-ip"
)


@dataclass
class Overrides:
    """Command-line values that replace NodeConfig fields when given."""

    node_name: str | None = None
    node_ips: list[str] = field(default_factory=list)
    cluster_cidrs: list[str] = field(default_factory=list)
    service_cidrs: list[str] = field(default_factory=list)
    node_port_addresses: list[str] = field(default_factory=list)
    masquerade_all: bool | None = None
    zone: str | None = None
    table_name: str | None = None

    def spec_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.node_ips:
            out["nodeIPs"] = self.node_ips
        if self.cluster_cidrs:
            out["clusterCIDRs"] = self.cluster_cidrs
        if self.service_cidrs:
            out["serviceCIDRs"] = self.service_cidrs
        if self.node_port_addresses:
            out["nodePortAddresses"] = self.node_port_addresses
        if self.masquerade_all is not None:
            out["masqueradeAll"] = self.masquerade_all
        if self.zone is not None:
            out["zone"] = self.zone
        if self.table_name is not None:
            out["tableName"] = self.table_name
        return out


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
