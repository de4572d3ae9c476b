"""Synthetic clusters for benchmarks: N Services x E endpoints, deterministic per seed.

The mix follows a typical cluster: 70 % ClusterIP, 15 % NodePort, 10 % LoadBalancer
(with source ranges), 5 % ClusterIP with ClientIP affinity; about 10 % with two ports;
some externalTrafficPolicy/internalTrafficPolicy Local. Written as one Kubernetes JSON
List, as ``kubectl get services,endpointslices -A -o json`` prints it.
"""

from __future__ import annotations

import ipaddress
import json
import random
from pathlib import Path
from typing import Any

Obj = dict[str, Any]
SERVICE_NET = ipaddress.ip_network("172.20.0.0/14")  # room for 250k ClusterIPs
POD_NET = ipaddress.ip_network("10.128.0.0/9")
LB_NET = ipaddress.ip_network("100.64.0.0/12")
NODES = [f"node-{i}" for i in range(50)]  # the benchmarked node is node-0


def node_config() -> Obj:
    return {
        "apiVersion": "svcrules.io/v1alpha1",
        "kind": "NodeConfig",
        "metadata": {"name": "node-0"},
        "spec": {
            "nodeIPs": ["192.0.2.1"],
            "clusterCIDRs": [str(POD_NET)],
            "serviceCIDRs": [str(SERVICE_NET)],
        },
    }


def cluster(services: int, endpoints: int, seed: int = 1) -> list[Obj]:
    """Service and EndpointSlice objects (no NodeConfig)."""
    rnd = random.Random(seed)
    objs: list[Obj] = []
    node_ports = iter(range(30000, 32768))
    pod_base = int(POD_NET.network_address)
    for i in range(services):
        ns = f"ns-{i % 200}"
        name = f"svc-{i}"
        roll = rnd.random()
        kind = "ClusterIP"
        if roll < 0.15:
            kind = "NodePort"
        elif roll < 0.25:
            kind = "LoadBalancer"
        affinity = 0.25 <= roll < 0.30
        two_ports = rnd.random() < 0.10
        ports: list[Obj] = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
        if two_ports:
            ports.append({"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353})
        if kind != "ClusterIP":
            for p in ports:
                p["nodePort"] = next(node_ports, 0) or None
                if p["nodePort"] is None:
                    del p["nodePort"]
        spec: Obj = {
            "type": kind,
            "clusterIP": str(SERVICE_NET.network_address + 1 + i),
            "clusterIPs": [str(SERVICE_NET.network_address + 1 + i)],
            "ports": ports,
            "selector": {"app": name},
        }
        if kind != "ClusterIP" and rnd.random() < 0.2:
            spec["externalTrafficPolicy"] = "Local"
        if rnd.random() < 0.05:
            spec["internalTrafficPolicy"] = "Local"
        if affinity:
            spec["sessionAffinity"] = "ClientIP"
        svc: Obj = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }
        if kind == "LoadBalancer":
            lb = str(LB_NET.network_address + 1 + i)
            spec["loadBalancerSourceRanges"] = ["192.0.2.0/24", "198.51.100.0/24"]
            svc["status"] = {"loadBalancer": {"ingress": [{"ip": lb}]}}
        objs.append(svc)
        eps = []
        for j in range(endpoints):
            eps.append(
                {
                    "addresses": [str(ipaddress.ip_address(pod_base + i * endpoints + j + 1))],
                    "conditions": {"ready": True, "serving": True, "terminating": False},
                    "nodeName": rnd.choice(NODES),
                }
            )
        objs.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{name}-abcde",
                    "namespace": ns,
                    "labels": {"kubernetes.io/service-name": name},
                },
                "addressType": "IPv4",
                "endpoints": eps,
                "ports": [
                    {"name": p["name"], "port": p["targetPort"], "protocol": p["protocol"]}
                    for p in ports
                ],
            }
        )
    return objs


# The pods of the netns lab (tests/kernel/lab.py), on the benchmarked node.
LAB_PODS = [f"198.51.100.{10 + i}" for i in range(1, 5)]


def lab_service(objs: list[Obj], index: int = 0, weights: tuple[int, ...] = ()) -> str:
    """Make Service ``index`` of a generated cluster (in place) one that the netns lab
    answers: a ClusterIP with one TCP port (80) whose endpoints are the lab's four pods.
    With ``weights``, the pods are split evenly into one EndpointSlice per weight, each
    annotated ``svcrules.io/weight`` (two weights: pods 1-2 and pods 3-4); the objects
    after it then move by one place. Returns the ClusterIP."""
    svc, sl = objs[2 * index], objs[2 * index + 1]
    assert svc["kind"] == "Service" and sl["kind"] == "EndpointSlice"
    spec = svc["spec"]
    spec["type"] = "ClusterIP"
    spec.pop("sessionAffinity", None)
    spec.pop("externalTrafficPolicy", None)
    spec.pop("internalTrafficPolicy", None)
    spec.pop("loadBalancerSourceRanges", None)
    svc.pop("status", None)
    spec["ports"] = spec["ports"][:1]
    for p in spec["ports"]:
        p.pop("nodePort", None)
    sl["ports"] = sl["ports"][:1]
    eps = [
        {"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node-0"} for ip in LAB_PODS
    ]
    if not weights:
        sl["endpoints"] = eps
        return str(spec["clusterIP"])
    per = len(eps) // len(weights)
    slices = []
    for k, weight in enumerate(weights):
        part = _copy(sl)
        part["metadata"]["name"] = f"{sl['metadata']['name']}-{k}"
        part["metadata"]["annotations"] = {"svcrules.io/weight": str(weight)}
        part["endpoints"] = eps[k * per : (k + 1) * per]
        slices.append(part)
    objs[2 * index + 1 : 2 * index + 2] = slices
    return str(spec["clusterIP"])


def write(path: Path, objs: list[Obj]) -> None:
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))


def with_changed_endpoint(objs: list[Obj], index: int = 0) -> list[Obj]:
    """A copy in which one endpoint of one Service moved to another address."""
    out: list[dict[str, Any]] = json.loads(json.dumps(objs))
    slices = [o for o in out if o["kind"] == "EndpointSlice"]
    ep = slices[index]["endpoints"][0]
    ip = ipaddress.ip_address(ep["addresses"][0])
    ep["addresses"] = [str(ip + (1 << 22))]
    return out


def with_added_service(objs: list[Obj], endpoints: int) -> list[Obj]:
    n = sum(1 for o in objs if o["kind"] == "Service")
    extra = cluster(n + 1, endpoints, seed=99)[-2:]
    extra[0]["metadata"]["name"] = extra[1]["metadata"]["labels"]["kubernetes.io/service-name"] = (
        "svc-added"
    )
    extra[0]["spec"]["type"] = "ClusterIP"
    extra[0]["spec"].pop("externalTrafficPolicy", None)
    for p in extra[0]["spec"]["ports"]:
        p.pop("nodePort", None)
    extra[0].pop("status", None)
    extra[0]["spec"].pop("loadBalancerSourceRanges", None)
    return [*objs, *extra]


def with_percent_changed(objs: list[Obj], percent: float = 1.0) -> list[Obj]:
    out: list[dict[str, Any]] = json.loads(json.dumps(objs))
    slices = [o for o in out if o["kind"] == "EndpointSlice"]
    step = max(1, int(100 / percent))
    for sl in slices[::step]:
        ip = ipaddress.ip_address(sl["endpoints"][0]["addresses"][0])
        sl["endpoints"][0]["addresses"] = [str(ip + (1 << 22))]
    return out


# Changes for sequences of runs (bench/sequence.py). Each is a pure function: it returns a
# new list and never mutates its input; unchanged objects are shared with it, changed ones
# are copies (so a step costs what it changes, even at 50k Services).


def _copy(obj: Obj) -> Obj:
    copied: Obj = json.loads(json.dumps(obj))
    return copied


def service_names(objs: list[Obj]) -> list[tuple[str, str]]:
    """(namespace, name) of every Service, in list order."""
    return [
        (o["metadata"]["namespace"], o["metadata"]["name"]) for o in objs if o["kind"] == "Service"
    ]


def _owned_by(obj: Obj, namespace: str, name: str) -> bool:
    meta = obj["metadata"]
    return bool(
        obj["kind"] == "EndpointSlice"
        and meta["namespace"] == namespace
        and meta.get("labels", {}).get("kubernetes.io/service-name") == name
    )


def endpoint_addresses(objs: list[Obj], namespace: str, name: str) -> list[str]:
    """The first address of each endpoint of a Service, in EndpointSlice order."""
    return [
        ep["addresses"][0] for o in objs if _owned_by(o, namespace, name) for ep in o["endpoints"]
    ]


def endpoint(address: str, node: str) -> Obj:
    """A ready endpoint, as the EndpointSlice controller writes one for a new pod."""
    return {
        "addresses": [address],
        "conditions": {"ready": True, "serving": True, "terminating": False},
        "nodeName": node,
    }


def with_endpoints_replaced(
    objs: list[Obj], namespace: str, name: str, remove: list[str], add: list[Obj]
) -> list[Obj]:
    """Pods replaced, as the EndpointSlice controller does it: the endpoints whose first
    address is in `remove` leave, the others keep their order, `add` is appended (to the
    Service's first EndpointSlice). One pod recreated is one address out and one in; a
    rollout step is several."""
    gone = set(remove)
    out: list[Obj] = []
    first = True
    for o in objs:
        if _owned_by(o, namespace, name):
            o = _copy(o)
            o["endpoints"] = [ep for ep in o["endpoints"] if ep["addresses"][0] not in gone]
            if first:
                o["endpoints"].extend(_copy(ep) for ep in add)
                first = False
        out.append(o)
    if first:
        raise ValueError(f"no EndpointSlice for Service {namespace}/{name}")
    return out


def with_service(
    objs: list[Obj], namespace: str, name: str, cluster_ip: str, endpoints: list[Obj]
) -> list[Obj]:
    """A new ClusterIP Service (one TCP port) and its EndpointSlice, appended."""
    svc: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
            "selector": {"app": name},
        },
    }
    sl: Obj = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name}-abcde",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "endpoints": [_copy(ep) for ep in endpoints],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }
    return [*objs, svc, sl]


def without_service(objs: list[Obj], namespace: str, name: str) -> list[Obj]:
    """The Service and its EndpointSlices removed."""
    out = [
        o
        for o in objs
        if not _owned_by(o, namespace, name)
        and not (
            o["kind"] == "Service"
            and o["metadata"]["namespace"] == namespace
            and o["metadata"]["name"] == name
        )
    ]
    if len(out) == len(objs):
        raise ValueError(f"no Service {namespace}/{name}")
    return out
