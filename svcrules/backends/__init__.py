"""Rule backends: each turns the node plan into its own rule language."""
