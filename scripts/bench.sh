#!/usr/bin/env bash
# The main-job command of a fresh machine: builds the environment if needed, then runs the
# benchmark on the best available device. Arguments go to python -m fusedpref.bench.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec python -m fusedpref.cli bench "$@"
