"""The text form of a Trace: what ``svcrules trace`` prints without ``-o json``."""

from __future__ import annotations

from svcrules.trace.model import Step, Trace

SOURCES = {
    "pod": "from a pod (inside clusterCIDRs)",
    "node": "from the node itself",
    "outside": "from outside the cluster",
}
VERDICTS = {
    "dnat": "dnat: translated to an endpoint",
    "reject": "reject: refused (ICMP port unreachable or TCP reset)",
    "drop": "drop: silently discarded",
    "untouched": "untouched: no svcrules rule translates, refuses or drops it",
}


def _step(s: Step, width: int) -> str:
    where = f"{s.table} {s.chain}".ljust(width)
    only = f"    [only to {', '.join(s.when)}]" if s.when else ""
    return f"  {where}  {s.rule}{only}"


def text(t: Trace) -> str:
    """Several lines: packet, verdict, endpoints, masquerade and why, the path."""
    p = t.packet
    dst = f"[{p.dst}]" if ":" in p.dst else p.dst
    sent = "sent by the node" if p.from_node else SOURCES.get(t.source, t.source)
    lines = [f"packet:     {p.proto} {p.src} -> {dst}:{p.port}, {sent} ({t.backend})"]
    lines.append(f"verdict:    {VERDICTS[t.verdict]}")
    if t.verdict == "dnat":
        lines.append("endpoints:")
        for ep in t.endpoints:
            note = ""
            if ep in t.masqueraded and not t.masquerade:
                note = "  masqueraded: the client is this endpoint (hairpin)"
            lines.append(f"  {ep:<28} {t.probabilities[ep]:>7.2%}{note}")
        if t.masquerade:
            masq = "yes: the endpoint sees the node's address as the source"
        elif t.masqueraded:
            masq = f"only to {', '.join(t.masqueraded)} (hairpin); otherwise no"
        else:
            masq = "no: the endpoint sees the client's address"
        lines.append(f"masquerade: {masq}")
        for s in t.masquerade_reason:
            lines.append(f"  because   {s.table} {s.chain}: {s.rule}")
        if t.affinity is not None:
            stick = (
                "the first packet picks, the next ones from this client stick to it"
                if t.affinity.sticky
                else "WARNING: a second packet from this client may land elsewhere"
            )
            lines.append(f"affinity:   ClientIP for {t.affinity.timeout} s: {stick}")
    if t.chains:
        width = max(len(f"{s.table} {s.chain}") for s in t.chains)
        lines.append("path (rules matched, in order):")
        lines.extend(_step(s, width) for s in t.chains)
    else:
        lines.append("path:       no svcrules rule matched")
    return "\n".join(lines) + "\n"
