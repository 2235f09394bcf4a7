#!/usr/bin/env bash
# The test command of a fresh machine: builds the environment if needed, then runs pytest.
# Without a GPU the Triton kernels run in the Triton interpreter and are compiled ahead of
# time for sm_80/sm_90. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
# every optional dependency was installed above: a missing one fails its tests instead of skipping
export FUSEDPREF_REQUIRE_ALL="${FUSEDPREF_REQUIRE_ALL:-1}"
# two xdist workers on this 2-core machine (FUSEDPREF_TEST_WORKERS=0: one process), each with one
# intra-op thread; the gloo tests share one worker (xdist_group "gloo": no two pick a port at once)
WORKERS="${FUSEDPREF_TEST_WORKERS:-2}"
if [ "$WORKERS" != "0" ] && [ "$WORKERS" != "1" ]; then
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    exec python -m pytest -q tests -n "$WORKERS" --dist loadgroup "$@"
fi
exec python -m pytest -q tests "$@"
