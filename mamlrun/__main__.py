"""`python -m mamlrun ...` is the same as the `mamlrun` console script."""

from mamlrun.cli import main

main()
