"""A kube-proxy-style nftables layout of the same cluster, for comparison only.

Shaped like kube-proxy's nftables mode (Kubernetes 1.31): a map from
ClusterIP . protocol . port to a chain per Service port, whose only rule picks an
endpoint chain through an anonymous ``numgen`` verdict map, and a chain per endpoint
that marks hairpin traffic and DNATs. Written from the published design, not copied;
only the kernel load time of this text is measured.
"""

from __future__ import annotations

from typing import Any


def render(objs: list[dict[str, Any]], table: str = "kube-proxy-like") -> str:
    services = {
        (o["metadata"]["namespace"], o["metadata"]["name"]): o
        for o in objs
        if o.get("kind") == "Service"
    }
    slices = {
        (o["metadata"]["namespace"], o["metadata"]["labels"]["kubernetes.io/service-name"]): o
        for o in objs
        if o.get("kind") == "EndpointSlice"
    }
    chains: list[str] = []
    elements: list[str] = []
    for n, (key, svc) in enumerate(sorted(services.items())):
        sl = slices.get(key)
        ip = svc["spec"]["clusterIP"]
        for port in svc["spec"]["ports"]:
            proto = port.get("protocol", "TCP").lower()
            eps = [e["addresses"][0] for e in (sl or {}).get("endpoints", [])]
            target = next(
                (p["port"] for p in (sl or {}).get("ports", []) if p["name"] == port["name"]), None
            )
            name = f"service-{n}-{port['name']}"
            if not eps or target is None:
                continue
            elements.append(f"{ip} . {proto} . {port['port']} : goto {name}")
            vmap = ", ".join(f"{i} : goto endpoint-{n}-{port['name']}-{i}" for i in range(len(eps)))
            chains.append(
                f"\tchain {name} {{\n\t\tip daddr {ip} {proto} dport {port['port']} "
                f"ip saddr != 10.128.0.0/9 jump mark-for-masquerade\n"
                f"\t\tnumgen random mod {len(eps)} vmap {{ {vmap} }}\n\t}}"
            )
            for i, ep in enumerate(eps):
                chains.append(
                    f"\tchain endpoint-{n}-{port['name']}-{i} {{\n"
                    f"\t\tip saddr {ep} jump mark-for-masquerade\n"
                    f"\t\tmeta l4proto {proto} dnat to {ep}:{target}\n\t}}"
                )
    head = [
        f"table ip {table} {{}}",
        f"delete table ip {table}",
        f"table ip {table} {{",
        "\tmap service-ips {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n"
        + (
            "\t\telements = {\n\t\t\t" + ",\n\t\t\t".join(elements) + "\n\t\t}\n"
            if elements
            else ""
        )
        + "\t}",
        "\tchain mark-for-masquerade {\n\t\tmeta mark set meta mark | 0x4000\n\t}",
        "\tchain nat-prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n"
        "\t\tip daddr . meta l4proto . th dport vmap @service-ips\n\t}",
    ]
    return "\n".join([*head, *chains, "}"]) + "\n"
