"""mamlrun: a command-line experiment runner for MAML and first-order MAML (Finn et al. 2017)."""

__version__ = "0.1.0"
