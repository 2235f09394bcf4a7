#!/usr/bin/env bash
# The GPU check (shared GUIDE.md section 5). Run once through the device tool when a GPU is lent:
#   bash bench/gpu_check.sh          (writes logs, CSV and PNG under $OUT; about 7 min)
# It installs this checkout offline over the machine's own torch + Triton, then runs: the
# benchmark's core table at the Llama-3-8B head shape (D=4096, V=128256, N=16384 all valid,
# bf16; eager, fused-triton, TRL, Liger, CCE), fused-triton at two larger backward chunks, the
# default `fusedpref bench` sweep (8 pairs x 1024 tokens, half prompt, every provider), the
# EXPO table (two heads, exact vocabulary KL) and the test suite compiled on the GPU
# (interpreter off, bf16 included). Each provider has its own time
# limit (--timeout), so one slow provider cannot cost the others' figures. The comparators are
# pure-Python wheels; the device machine has no network, so fetch them here first and carry
# .wheels:  pip download --no-deps -d .wheels liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0
#   and, for TRL's backward (it imports datasets; the machine has the rest):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .wheels datasets==5.2.0 dill multiprocess
# (device tool: run(command="bash bench/gpu_check.sh", carry=[".wheels"], timeout_s=600)).
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
"$PY" -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/env.txt" 2>&1 || { cat "$OUT/env.txt"; exit 1; }
if ls .wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-deps --no-index .wheels/*.whl >> "$OUT/env.txt" 2>&1 || true
fi

# At most 8 files come back from the device: env.txt, pytest.log, bench.txt (every table) and
# the CSV/PNG files of the bench runs. Each bench run has a --budget (it always writes its table
# and files; providers left without time say so) under a backstop timeout; in all about 7
# minutes, leaving time on a 15-minute device lease for the machine's start and one partial rerun.
status=0
bench() {  # bench <budget seconds> <args...>: appends the table to bench.txt
    local b=$1; shift
    echo "## fusedpref bench --budget $b $*" >> "$OUT/bench.txt"
    timeout $((b + 20)) "$PY" -m fusedpref.cli bench --budget "$b" "$@" >> "$OUT/bench.txt" 2>&1 || status=1
}
# 1. the core table: 4 pairs x 2 x 2048 = 16384 tokens, all valid, Llama-3-8B head, bf16
bench 110 --pairs 4 --seq 2048 --prompt-frac 0 --no-sweep --providers eager,fused-triton,trl,liger,cce \
    --timeout 45 --out "$OUT" --tag core
# 2. the backward's vocabulary chunk (default 32 MiB): larger chunks mean fewer read-modify-write
#    passes over the fp32 dH accumulator, at more memory (tables only; CSVs stay on the machine)
for mb in 128 512; do
    FUSEDPREF_CHUNK_MB=$mb bench 30 --pairs 4 --seq 2048 --prompt-frac 0 --no-sweep \
        --providers fused-triton --out /tmp/chunk --tag "chunk$mb"
done
# 3. the default bench (sweep + PNG), then EXPO (two heads, exact vocabulary KL)
#    (torch.compile last: its compilations take what the budget leaves)
bench 90 --providers eager,fused-triton,fused-torch,trl,liger,cce,compile --timeout 25 --out "$OUT"
bench 40 --loss-type expo --no-sweep --providers eager,fused-triton,compile --timeout 20 --out "$OUT" --tag expo
cat "$OUT/bench.txt"
# 4. the suite on the GPU (kernels compiled for real; AOT and CPU-memory tests included; no -x:
#    one run reports every failure)
timeout 130 "$PY" -m pytest -q -rfE tests -p no:cacheprovider --durations=15 > "$OUT/pytest.log" 2>&1 || status=1
tail -n 40 "$OUT/pytest.log"
exit $status
