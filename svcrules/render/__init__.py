"""Spelling a node plan in a backend's syntax: one package per backend
(``nftables/``, ``iptables/``) over the Jinja2 templates in the top-level
``templates/`` folder."""
