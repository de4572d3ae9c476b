"""Command-line values that replace NodeConfig fields: a plain dataclass.

Kept apart from ``config.py`` (which validates NodeConfigs with pydantic) so that
the command line can declare its flags without importing pydantic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
