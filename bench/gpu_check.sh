#!/usr/bin/env bash
# The GPU check (shared GUIDE.md section 5). Run once through the device tool when a GPU is lent:
#   bash bench/gpu_check.sh          (writes logs, CSV and PNG under $OUT; must finish in < 8 min)
# It installs this checkout offline over the machine's own torch + Triton, runs the test suite
# compiled on the GPU (interpreter off, bf16 included), then the benchmark: the core table at
# the Llama-3-8B head shape (D=4096, V=128256, N=16384 all valid, bf16) and the default
# `fusedpref bench` sweep (8 pairs x 1024 tokens, half prompt); each provider has its own time
# limit (--timeout), so one slow provider cannot cost the others' figures. The comparators are
# pure-Python wheels; the device machine has no network, so fetch them here first and carry
# .wheels:  pip download --no-deps -d .wheels liger-kernel==0.8.5 cut-cross-entropy==25.1.1
set -uo pipefail
OUT="${OUT:-$(pwd)/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=1
{
    date -u
    nvidia-smi || true
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
"$PY" -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
if ls .wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-deps --no-index .wheels/*.whl >> "$OUT/install.log" 2>&1 || true
fi

status=0
# 1. the suite on the GPU (kernels compiled for real; AOT and CPU-memory tests included)
# (no -x: device time is scarce, so one run reports every failure; --durations shows the slow ones)
timeout 300 "$PY" -m pytest -q tests -p no:cacheprovider --durations=15 --junitxml="$OUT/pytest.xml" \
    > "$OUT/pytest.log" 2>&1 || status=1
tail -n 30 "$OUT/pytest.log"
# 2. the core table: N = 8 x 2048 = 16384 tokens, all valid
timeout 150 "$PY" -m fusedpref.cli bench --pairs 4 --seq 2048 --prompt-frac 0 --no-sweep \
    --providers eager,fused-triton,liger,cce --timeout 60 --out "$OUT" --tag core > "$OUT/bench_core.txt" 2>&1 || status=1
cat "$OUT/bench_core.txt"
# 3. the default bench (sweep + PNG)
timeout 200 "$PY" -m fusedpref.cli bench --timeout 45 --out "$OUT" > "$OUT/bench_default.txt" 2>&1 || status=1
cat "$OUT/bench_default.txt"
exit $status
