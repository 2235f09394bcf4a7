"""`python -m fusedpref ...` is the `fusedpref` command."""
import sys

from .cli import main

sys.exit(main())
