"""Reading the inputs: files, directories and stdin, the Kubernetes models, the
NodeConfig, addresses, and the names svcrules may own. The bottom layer: it imports
no other part of svcrules but ``errors``."""
