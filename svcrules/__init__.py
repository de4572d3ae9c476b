"""svcrules: compile Kubernetes Services into deterministic nftables rules.

The public surface is small: load objects, compile them for a node, render.
"""

from svcrules.compiler import Ruleset, compile, compile_paths
from svcrules.errors import InputError, SvcrulesError
from svcrules.inputs.config import Overrides
from svcrules.inputs.load import Inputs, load_paths
from svcrules.inputs.model import EndpointSlice, NodeConfig, Service
from svcrules.plan.node import NodePlan

__all__ = [
    "EndpointSlice",
    "InputError",
    "Inputs",
    "NodeConfig",
    "NodePlan",
    "Overrides",
    "Ruleset",
    "Service",
    "SvcrulesError",
    "compile",
    "compile_paths",
    "load_paths",
]
__version__ = "0.1.0"
