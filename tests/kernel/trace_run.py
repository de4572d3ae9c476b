"""Runs ``svcrules.kernel.trace.trace_kernel`` where it is started (the lab's node, for
tests/kernel/test_trace_kernel.py): the packet and the keyword arguments as JSON in
argv[1]; prints the Trace's JSON form, or ``{"error": …, "type": …}`` and exits 2."""

from __future__ import annotations

import json
import sys

from svcrules.errors import SvcrulesError
from svcrules.kernel.trace import trace_kernel
from svcrules.trace.model import Packet


def main() -> int:
    args = json.loads(sys.argv[1])
    packet = Packet(**args.pop("packet"))
    try:
        trace = trace_kernel(packet, **args)
    except SvcrulesError as exc:
        print(json.dumps({"error": str(exc), "type": type(exc).__name__}))
        return 2
    print(json.dumps(trace.as_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
