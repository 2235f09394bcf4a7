# Sourced by scripts/test.sh (and later commands): creates ./.venv on first use with torch (the
# CPU build torch==2.13.0 where there is no NVIDIA GPU), triton, numpy, the dev tools, the
# benchmark's comparators (Liger-Kernel, Cut Cross-Entropy, TRL) and fusedpref itself (editable), then
# activates it. Override the torch spec with FUSEDPREF_TORCH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FUSEDPREF_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, triton, fusedpref, pytest, hypothesis, xdist" 2>/dev/null; then
    echo "[fusedpref] creating environment in $VENV" >&2
    python3 -m venv "$VENV"
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        TORCH_SPEC="${FUSEDPREF_TORCH:-torch}"
    else
        TORCH_SPEC="${FUSEDPREF_TORCH:-torch==2.13.0}"
    fi
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -m pip install -q triton numpy pytest pytest-xdist hypothesis pytest-benchmark matplotlib tqdm 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -c "import torch, triton, fusedpref; print('[fusedpref] torch', torch.__version__, 'triton', triton.__version__)" >&2
fi
# the benchmark's comparators: Liger-Kernel and Cut Cross-Entropy (pure-Python wheels over the
# torch + Triton above, --no-deps) and TRL with its dependencies (its chunked LM head's backward
# imports trl.trainer.utils: transformers, accelerate, datasets, pandas) and PEFT (the LoRA tests
# of the TRL integration), constrained to the installed torch so that nothing can pull another
# torch build.
if ! "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('liger_kernel', 'cut_cross_entropy', 'trl', 'transformers', 'accelerate', 'datasets', 'pandas', 'peft')))" 2>/dev/null; then
    echo "[fusedpref] installing the benchmark's comparators (Liger-Kernel, Cut Cross-Entropy, TRL)" >&2
    "$VENV/bin/python" -m pip install -q --no-deps liger-kernel==0.8.5 cut-cross-entropy==25.1.1 2>&1 | grep -v "^WARNING: Location" || true
    CONSTRAINT="$(mktemp)"
    "$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" > "$CONSTRAINT"
    "$VENV/bin/python" -m pip install -q -c "$CONSTRAINT" trl==1.16.0 transformers==5.24.0 peft==0.21.2 2>&1 | grep -v "^WARNING: Location" || true
    rm -f "$CONSTRAINT"
    # a failed install is an error, not a later skip
    "$VENV/bin/python" -c "import liger_kernel.chunked_loss, cut_cross_entropy, trl.kernels, transformers, datasets, peft" || {
        echo "[fusedpref] error: the benchmark's comparators (liger-kernel, cut-cross-entropy, trl, peft) did not install" >&2
        exit 1
    }
fi
# DeepSpeed (ZeRO-3 under accelerate launch, tests/test_engines.py): pinned, no compiled ops
# (DS_BUILD_OPS=0: a CPU run needs none), its dependencies constrained to the installed torch
if ! "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('deepspeed', 'hjson', 'msgpack', 'cpuinfo', 'pydantic', 'einops')))" 2>/dev/null; then
    echo "[fusedpref] installing DeepSpeed 0.19.8 (no compiled ops)" >&2
    CONSTRAINT="$(mktemp)"
    "$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" > "$CONSTRAINT"
    DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q -c "$CONSTRAINT" deepspeed==0.19.8 2>&1 | grep -v "^WARNING" || true
    rm -f "$CONSTRAINT"
    DS_ACCELERATOR=cpu "$VENV/bin/python" -c "import deepspeed" || {
        echo "[fusedpref] error: deepspeed==0.19.8 did not install" >&2
        exit 1
    }
fi
# Triton 3.6, the GPU machines' version, beside the main one: tests/test_aot.py compiles every
# kernel with it too (pure wheel, --no-deps, into its own folder; never imported otherwise)
if [ ! -d "$VENV/triton36/triton" ]; then
    echo "[fusedpref] installing Triton 3.6 for the compile check" >&2
    "$VENV/bin/python" -m pip install -q --no-deps --target "$VENV/triton36" triton==3.6.0 2>&1 | grep -v "^WARNING" || true
    [ -d "$VENV/triton36/triton" ] || { echo "[fusedpref] error: triton==3.6.0 did not install" >&2; exit 1; }
fi
export FUSEDPREF_TRITON36="$VENV/triton36"
export PATH="$VENV/bin:$PATH"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
