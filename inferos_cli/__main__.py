"""`python -m inferos_cli` runs the CLI."""

from inferos_cli.cli import main

main()
