"""`python -m histofed.cli ...` runs the `histofed` command."""

from histofed.cli import main

main()
