"""`python -m dscompile`: the command line."""

from dscompile.cli import main

main()
