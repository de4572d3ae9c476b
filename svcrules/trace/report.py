"""The text form of a Trace: what ``svcrules trace`` prints without ``-o json``."""

from __future__ import annotations

from svcrules.trace.model import Pick, Step, Trace

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


HASHED = {
    "flow": ("the flow", "a flow takes the same endpoint on every node with this table"),
    "client": (
        "the client's address",
        "a client takes the same endpoint on every node with this table",
    ),
}


def _pick(p: Pick) -> list[str]:
    """How one rule picks: its algorithm, and for Maglev what the hash reads."""
    if p.size is None:
        return [f"picked:     at random, by the statistic rules of {p.table} {p.chain}"]
    if p.algorithm == "random":
        return [f"picked:     at random: one of {p.size} slots, each as likely ({p.chain})"]
    what, meaning = HASHED.get(p.hash, (p.hash, ""))
    fields = " . ".join(p.fields)
    taken = (
        f"slot {p.slot} for this source port"
        if p.slot is not None
        else "every slot taken as equally likely"
    )
    return [
        f"picked:     maglev: jhash of {what} ({fields}), seed 0x{p.seed or 0:x}, {p.size} slots",
        f"            ({meaning}); {taken} ({p.chain})",
    ]


def text(t: Trace) -> str:
    """Several lines: packet, verdict, endpoints, masquerade and why, the path."""
    p = t.packet
    dst = f"[{p.dst}]" if ":" in p.dst else p.dst
    sent = "sent by the node" if p.from_node else SOURCES.get(t.source, t.source)
    lines = [f"packet:     {p.proto} {p.src} -> {dst}:{p.port}, {sent} ({t.backend})"]
    lines.append(f"verdict:    {VERDICTS[t.verdict]}")
    if t.verdict == "dnat":
        lines.append("endpoints:")
        # Each endpoint's slots, where one table's slots decide all of them and some
        # endpoint has more than one (weights, Maglev).
        tables = [p for p in t.balancing if p.slots]
        slots = dict(tables[0].slots) if len(tables) == 1 else {}
        if all(n == 1 for n in slots.values()):
            slots = {}
        for ep in t.endpoints:
            note = ""
            if ep in slots:
                note = f"  {slots[ep]} of {tables[0].size} slots"
            if ep in t.masqueraded and not t.masquerade:
                note += "  masqueraded: the client is this endpoint (hairpin)"
            lines.append(f"  {ep:<28} {t.probabilities[ep]:>7.2%}{note}")
        for pick in t.balancing:
            lines.extend(_pick(pick))
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
