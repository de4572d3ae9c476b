"""Bringing the kernel to a compiled ruleset: reconcile (no-op, incremental, full),
the state directory, the lock, conntrack, metrics; one package per backend with its
transport, diff and driver."""
