"""What happens to one packet, answered from the compiled rules (``svcrules trace``).

An interpreter of exactly the subset of nft and iptables-restore syntax svcrules
emits, run over the text a backend would load, not over the plan it came from:
it reads the rules as the kernel would and so can disagree with the plan when a
backend spells something wrong. Anything outside that subset is an error, never a
guess (``TraceError``).

- ``model``: the packet asked about and the answer (``Trace``), with its JSON form;
- ``flow``: one path of a packet through the hooks, and how paths are summed up;
- ``nft`` and ``iptables``: each backend's parser and evaluator;
- ``backends``: which interpreter reads which text;
- ``report``: the text form; ``cases``: expectations for ``check --packets``.
"""

from __future__ import annotations

from svcrules.trace.backends import trace
from svcrules.trace.model import Packet, Step, Trace, TraceError

__all__ = ["Packet", "Step", "Trace", "TraceError", "trace"]
