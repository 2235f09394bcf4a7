#!/usr/bin/env bash
# The GPU check (shared GUIDE.md section 5): the one script that runs on a lent GPU machine.
#   bash bench/gpu_check.sh            run it (writes under $OUT; at most 8 files come back)
#   bash bench/gpu_check.sh --plan     print each step's time budget and the total; run nothing
#   DRY_RUN=1 bash bench/gpu_check.sh  the same flow on the CPU at tiny shapes (Triton interpreter;
#                                      tests/test_gpu_check.py runs it)
# Built to be worth its single run even when something fails: every step has its own budget
# (`timeout`), a failing step does not stop the later ones, and the order puts what localises
# a failure first: (1) a smoke test of every kernel path x dtype x shape against the torch
# backend, one verdict line each; (2) per-kernel timing beside a cuBLAS GEMM of the same FLOPs,
# backward chunk widths, fused-triton vs fused-torch; (3) the core table at the main shape with
# fused-triton first (its kernels are compiled and cached by then); (4) the default sweep and
# the EXPO table; (5) the GPU-relevant tests, stopped with SIGINT so pytest prints its summary.
# Installs are offline: this checkout with --no-deps, then the comparator wheels in .wheels/
# (carried by the device tool: run(command="bash bench/gpu_check.sh", carry=[".wheels"],
# timeout_s=540)). Fetch them here first:
#   pip download --no-deps -d .wheels liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .wheels datasets==5.2.0 dill multiprocess
set -uo pipefail
STEPS=(
    "install|25|offline install of this checkout and .wheels"
    "smoke|90|every kernel path x dtype x shape vs the torch backend"
    "kernels|80|per-kernel ms vs cuBLAS, chunk widths, triton vs torch, loss paths vs torch/QuACK LCE"
    "core|100|core table N=16384 D=4096 V=128256 bf16 (fused-triton first)"
    "sweep|70|default bench sweep + PNG"
    "expo|40|EXPO table (two heads, exact KL)"
    "tests|70|GPU-relevant tests (SIGINT at the budget)"
)
budget() { local s; for s in "${STEPS[@]}"; do IFS='|' read -r n b _ <<< "$s"; [ "$n" = "$1" ] && echo "$b"; done; }
if [ "${1:-}" = "--plan" ]; then
    total=0
    for s in "${STEPS[@]}"; do
        IFS='|' read -r n b what <<< "$s"
        printf '%-8s %4d s  %s\n' "$n" "$b" "$what"
        total=$((total + b))
    done
    printf 'total    %4d s  (limit 480)\n' "$total"
    exit 0
fi
OUT="${OUT:-$(pwd)/out/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
DRY="${DRY_RUN:-0}"
status=0
step() {  # step <name> <command...>: runs under the step's budget, records its time
    local name=$1; shift
    local t0=$SECONDS
    echo "## step $name (budget $(budget "$name") s)" >> "$OUT/check.txt"
    timeout -s INT "$(budget "$name")" "$@" >> "$OUT/check.txt" 2>&1
    local rc=$?
    [ $rc -eq 0 ] || { status=1; echo "## step $name: exit $rc" >> "$OUT/check.txt"; }
    echo "## step $name took $((SECONDS - t0)) s" >> "$OUT/check.txt"
}
if [ "$DRY" = "1" ]; then
    export TRITON_INTERPRET=1
    GC="--dry-run"; SHAPE=(--pairs 1 --seq 32 --d 32 --v 1000 --repeats 1 --dtype float32); PROVIDERS="fused-torch,eager"
else
    unset TRITON_INTERPRET
    GC=""; SHAPE=(); PROVIDERS="fused-triton,fused-torch,eager,trl,liger,cce,torch"
fi
export TRITON_DEFAULT_FP_FUSION=1
{
    date -u
    command -v nvidia-smi >/dev/null && nvidia-smi
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
} > "$OUT/env.txt" 2>&1
export PY DRY
step install bash -c '
    if [ "$DRY" = "1" ]; then echo "dry run: nothing installed"; exit 0; fi
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    if ls .wheels/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-deps --no-index .wheels/*.whl
    else
        echo "no .wheels/: the trl, liger and cce providers will say unavailable"
    fi' 
step smoke "$PY" -m fusedpref.gpucheck smoke $GC
step kernels "$PY" -m fusedpref.gpucheck kernels $GC --jsonl "$OUT/kernels.jsonl"
if [ "$DRY" = "1" ]; then
    step core "$PY" -m fusedpref.cli bench "${SHAPE[@]}" --no-sweep --providers "$PROVIDERS" --out "$OUT" --tag core --budget 60
    step sweep "$PY" -m fusedpref.cli bench "${SHAPE[@]}" --providers fused-torch --out "$OUT" --tag sweep --budget 60
    step expo "$PY" -m fusedpref.cli bench "${SHAPE[@]}" --no-sweep --loss-type expo --providers fused-torch --out /tmp/gpu_check_expo --tag expo --budget 30
    step tests "$PY" -m pytest -q -p no:cacheprovider tests/test_schedule.py -k forward_order
else
    step core "$PY" -m fusedpref.cli bench --pairs 4 --seq 2048 --prompt-frac 0 --no-sweep --providers "$PROVIDERS" \
        --timeout 40 --budget 95 --out "$OUT" --tag core
    step sweep "$PY" -m fusedpref.cli bench --providers fused-triton,eager,trl,liger,cce,compile --timeout 20 --budget 65 \
        --out "$OUT" --tag sweep
    step expo "$PY" -m fusedpref.cli bench --loss-type expo --no-sweep --providers fused-triton,eager \
        --timeout 18 --budget 35 --out /tmp/gpu_check_expo --tag expo
    step tests "$PY" -m pytest -q -rfE -p no:cacheprovider --durations=10 tests/test_logprobs.py tests/test_kl.py \
        tests/test_expo.py tests/test_losses.py tests/test_reliability.py tests/test_properties.py -k triton
fi
cat "$OUT/check.txt"
# what comes back (<= 8 files): env.txt check.txt kernels.jsonl bench-core.csv bench-sweep.csv bench-sweep.png
ls "$OUT"
exit $status
