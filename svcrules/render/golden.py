"""Golden files: the rules as a reviewer keeps them (``svcrules check --golden``).

A golden file is compared, and written, without the lines that change with every
change whatever it is: each table's fingerprint (the nftables ``state`` element's
comment, the iptables ``<P>-STATE`` rule's comment; in the JSON form too) reads
``svcrules <fingerprint>``. Two pull requests that change different Services then
touch different lines. The nftables golden form also groups the elements of the
shared sets and maps under a comment naming their Service (layout.render_nft_golden).
"""

from __future__ import annotations

import re

FINGERPRINT = "<fingerprint>"
_VOLATILE = re.compile(r'"svcrules [0-9a-f]{32}"')


def normalize(text: str) -> str:
    """``text`` without its volatile parts: every fingerprint as ``<fingerprint>``."""
    return _VOLATILE.sub(f'"svcrules {FINGERPRINT}"', text)
