#!/usr/bin/env bash
# The test command of a fresh machine: builds the environment if needed, then runs pytest.
# Without a GPU the Triton kernels run in the Triton interpreter and are compiled ahead of
# time for sm_80/sm_90. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
# every optional dependency was installed above: a missing one fails its tests instead of skipping
export FUSEDPREF_REQUIRE_ALL="${FUSEDPREF_REQUIRE_ALL:-1}"
exec python -m pytest -q tests "$@"
