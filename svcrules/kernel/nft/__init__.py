"""The nftables backend's kernel side: libnftables or nft (transport), the
incremental diff of two scripts, and the driver reconcile talks to."""
