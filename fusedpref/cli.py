"""The `fusedpref` command: `fusedpref bench ...`, `fusedpref desiderata --out DIR`."""
from __future__ import annotations

import sys

USAGE = """usage: fusedpref {bench,roofline,desiderata} [options] | --version

  bench        fused preference loss vs eager PyTorch (and torch.compile, TRL, Liger, CCE when present)
  roofline     modelled FLOPs, HBM bytes and lower-bound time per kernel (estimates) for a shape and GPU
  desiderata   the EXPO/TYPO papers' synthetic tests with fusedpref's own losses (--lm: on a language model
               through TRL's DPOTrainer)

Run `fusedpref <command> --help` for the options."""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(f"fusedpref {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "roofline":
        from .schedule import main as roofline_main

        return roofline_main(rest)
    if cmd == "bench":
        from .bench import main as bench_main

        bench_main(rest)
        return 0
    if cmd == "desiderata":
        if "--lm" in rest:     # the language-model version (TRL's DPOTrainer; needs fusedpref[trl])
            from .desiderata_lm import main as lm_main

            return lm_main(rest)
        from .desiderata import main as des_main

        des_main(rest)
        return 0
    print(f"fusedpref: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
