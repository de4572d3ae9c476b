"""The nftables rendering: layout (tables, sets, maps, chains) and nft text, and the
libnftables JSON form of the same ruleset."""
