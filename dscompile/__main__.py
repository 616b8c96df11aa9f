"""`python -m dscompile`: the command line."""

from dscompile.exporter.cli import main

main()
