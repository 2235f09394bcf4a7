"""The `fusedpref` command: `fusedpref bench ...`, `fusedpref desiderata --out DIR`."""
from __future__ import annotations

import sys

USAGE = """usage: fusedpref {bench,desiderata} [options]

  bench        fused preference loss vs eager PyTorch (and torch.compile, Liger, CCE when present)
  desiderata   the EXPO/TYPO papers' synthetic tests with fusedpref's own losses

Run `fusedpref <command> --help` for the options."""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "bench":
        from .bench import main as bench_main

        bench_main(rest)
        return 0
    if cmd == "desiderata":
        from .desiderata import main as des_main

        des_main(rest)
        return 0
    print(f"fusedpref: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
