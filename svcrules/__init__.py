"""svcrules: compile Kubernetes Services into deterministic nftables rules.

The public surface is small: load objects, compile them for a node, render.

The names below are loaded on first use (PEP 562), not when the package is
imported: ``svcrules --help`` and every ``svcrules.*`` submodule import go through
this file, and the compiler behind these names pulls in pydantic, PyYAML, orjson
and Jinja2.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from svcrules.compiler import Ruleset, compile, compile_paths
    from svcrules.errors import InputError, SvcrulesError
    from svcrules.inputs.load import Inputs, load_paths
    from svcrules.inputs.model import EndpointSlice, NodeConfig, Service
    from svcrules.inputs.overrides import Overrides
    from svcrules.plan.node import NodePlan

# public name -> the module that defines it
_LAZY = {
    "EndpointSlice": "svcrules.inputs.model",
    "InputError": "svcrules.errors",
    "Inputs": "svcrules.inputs.load",
    "NodeConfig": "svcrules.inputs.model",
    "NodePlan": "svcrules.plan.node",
    "Overrides": "svcrules.inputs.overrides",
    "Ruleset": "svcrules.compiler",
    "Service": "svcrules.inputs.model",
    "SvcrulesError": "svcrules.errors",
    "compile": "svcrules.compiler",
    "compile_paths": "svcrules.compiler",
    "load_paths": "svcrules.inputs.load",
}

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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is an ordinary global
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
