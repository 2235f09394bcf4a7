#!/usr/bin/env bash
# The GPU check (shared GUIDE.md section 5). Run once through the device tool when a GPU is lent:
#   bash bench/gpu_check.sh          (writes logs and CSV under $OUT; must finish in < 8 min)
# It installs this checkout offline over the machine's own torch + Triton, runs the test suite
# compiled on the GPU (interpreter off, bf16 included), then the first fused-vs-eager table at
# the Llama-3-8B head shape (D=4096, V=128256, N=16384, bf16).
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

status=0
# 1. the suite on the GPU (kernels compiled for real; AOT and CPU-memory tests included)
timeout 300 "$PY" -m pytest -q -x tests -p no:cacheprovider --junitxml="$OUT/pytest.xml" \
    > "$OUT/pytest.log" 2>&1 || status=1
tail -n 30 "$OUT/pytest.log"
# 2. the first benchmark table (fused triton vs eager PyTorch)
timeout 150 "$PY" -m fusedpref.bench --n 16384 --d 4096 --v 128256 --dtype bfloat16 \
    --csv "$OUT/bench_core.csv" > "$OUT/bench_core.txt" 2>&1 || status=1
cat "$OUT/bench_core.txt"
exit $status
