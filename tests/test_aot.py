"""Every kernel compiles ahead of time for sm_80 and sm_90 in fp32, fp16 and bf16 (no GPU
needed): zero register spills, and the sm_90 PTX uses wgmma."""
import json
import os
import subprocess
import sys

import pytest

EXPECTED_KERNELS = {"logprob_fwd", "logprob_fwd_stats", "logprob_dz", "mm_acc", "kl_fwd", "kl_fwd_logp",
                    "kl_fwd_logp_stats", "kl_dz", "kl_dz_logp"}


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "fusedpref._aot"], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_arch_dtype_compiles(compiled):
    got = {(r["kernel"], r["arch"], r["dtype"]) for r in compiled}
    want = {(k, a, d) for k in EXPECTED_KERNELS for a in ("sm_80", "sm_90")
            for d in ("float32", "float16", "bfloat16")}
    assert want <= got, sorted(want - got)


def test_no_register_spills(compiled):
    spills = [r for r in compiled if r["stack"] or r["local"]]
    assert not spills, spills
    assert all(0 < r["reg"] <= 255 for r in compiled)


def test_sm90_uses_wgmma(compiled):
    missing = [r for r in compiled if r["arch"] == "sm_90" and not r["wgmma"]]
    assert not missing, missing
    assert any(r["arch"] == "sm_90" for r in compiled)
