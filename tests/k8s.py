"""Builders for Kubernetes objects as the API returns them (plain dicts).

Tests describe clusters with these so that each case reads like the YAML a
user would write, and the same objects feed unit, golden and kernel tests.
"""

from __future__ import annotations

import io
from typing import Any

import yaml

import svcrules
from svcrules.inputs.config import Overrides
from svcrules.inputs.load import Inputs, load_text

Obj = dict[str, Any]


def service(
    name: str,
    cluster_ip: str | list[str],
    ports: list[Obj] | None = None,
    namespace: str = "default",
    type: str = "ClusterIP",
    labels: dict[str, str] | None = None,
    lb_ips: list[str] | None = None,
    **spec: Any,
) -> Obj:
    ips = cluster_ip if isinstance(cluster_ip, list) else [cluster_ip]
    body: Obj = {
        "type": type,
        "clusterIP": ips[0],
        "clusterIPs": [ip for ip in ips if ip],
        "ports": ports if ports is not None else [{"name": "http", "port": 80, "protocol": "TCP"}],
    }
    body.update(spec)
    obj: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": body,
    }
    if lb_ips is not None:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in lb_ips]}}
    return obj


def endpoint(
    ip: str,
    node: str | None = "node-a",
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = None,
    zone: str | None = None,
    for_zones: list[str] | None = None,
    for_nodes: list[str] | None = None,
) -> Obj:
    conditions: Obj = {}
    if ready is not None:
        conditions["ready"] = ready
    if serving is not None:
        conditions["serving"] = serving
    if terminating is not None:
        conditions["terminating"] = terminating
    ep: Obj = {"addresses": [ip], "conditions": conditions}
    if node is not None:
        ep["nodeName"] = node
    if zone is not None:
        ep["zone"] = zone
    if for_zones is not None or for_nodes is not None:
        ep["hints"] = {
            "forZones": [{"name": z} for z in for_zones or []],
            "forNodes": [{"name": n} for n in for_nodes or []],
        }
    return ep


def endpoint_slice(
    service_name: str,
    endpoints: list[Obj],
    ports: list[Obj] | None = None,
    namespace: str = "default",
    name: str | None = None,
    family: str = "IPv4",
) -> Obj:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{service_name}-{family.lower()}",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": family,
        "endpoints": endpoints,
        "ports": ports
        if ports is not None
        else [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def node_config(name: str = "node-a", **spec: Any) -> Obj:
    body: Obj = {"nodeIPs": ["192.0.2.1", "2001:db8:1::1"]}
    body.update(spec)
    return {
        "apiVersion": "svcrules.io/v1alpha1",
        "kind": "NodeConfig",
        "metadata": {"name": name},
        "spec": body,
    }


def dump(objs: list[Obj]) -> str:
    return yaml.safe_dump_all(objs, sort_keys=True)


def inputs(objs: list[Obj], path: str = "test.yaml") -> Inputs:
    out = Inputs()
    problems: list[svcrules.errors.Problem] = []
    load_text(dump(objs), path, out, problems)
    if problems:
        raise svcrules.InputError(problems)
    return out


def compile_objs(objs: list[Obj], backend: str = "nftables", **overrides: Any) -> svcrules.Ruleset:
    """Compile objects (a NodeConfig among them) as the CLI would read them."""
    return svcrules.compile_paths(
        ["-"], overrides=Overrides(**overrides), stdin=io.StringIO(dump(objs)), backend=backend
    )
