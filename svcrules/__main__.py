"""``python -m svcrules`` runs the command line."""

from svcrules.cli import main

main()
