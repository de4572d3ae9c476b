"""The iptables backend's kernel side: the iptables-nft or iptables-legacy tools
(transport), restore inputs cut and diffed per chain, and the driver."""
