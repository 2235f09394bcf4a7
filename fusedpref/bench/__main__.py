"""`python -m fusedpref.bench ...` (also the worker processes' entry point)."""
from .cli import main

main()
