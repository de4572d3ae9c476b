"""The iptables rendering: kube-proxy-style chains as iptables-restore input."""
