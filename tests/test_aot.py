"""Every kernel compiles ahead of time for sm_80 and sm_90 in fp32, fp16 and bf16 (no GPU
needed), as two binaries each: the general one (bias and soft-cap on) and the specialisation the
JIT builds at the main shape (every integer argument divisible by 16, flags off); with the newest
Triton and with Triton 3.6 (the GPU machines' version): zero register spills, at most
REG_LIMIT registers (a margin under the 255 at which the compiler starts spilling), and the
sm_90 PTX uses wgmma."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow   # ahead-of-time compiles (minutes)

EXPECTED_KERNELS = {"logprob_fwd", "logprob_fwd_stats", "logprob_dz", "logprob_dz_stats", "mm_acc", "kl_fwd",
                    "kl_fwd_logp", "kl_fwd_logp_stats", "kl_fwd_rev_stats", "kl_fwd_jsd_stats", "jsd_fwd", "kl_dz",
                    "kl_dz_logp", "kl_dz_logp_stats", "kl_dz_rev_stats", "kl_dz_jsd_stats", "mm_acc_scaled",
                    "chunk_logits", "chunk_probs_stats", "chunk_kl_probs_stats"}
REG_LIMIT = 240


def _triton36():
    """The folder holding Triton 3.6 (scripts/env.sh installs it into .venv/triton36)."""
    path = os.environ.get("FUSEDPREF_TRITON36")
    if path and os.path.isdir(os.path.join(path, "triton")):
        return path
    if os.environ.get("FUSEDPREF_REQUIRE_ALL") == "1":
        pytest.fail("Triton 3.6 is not installed (scripts/env.sh puts it in .venv/triton36; FUSEDPREF_TRITON36)")
    pytest.skip("Triton 3.6 not installed (set FUSEDPREF_TRITON36 to a folder holding it)")


@pytest.fixture(scope="module", params=["installed", "3.6"])
def compiled(request):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if request.param == "3.6":
        env["PYTHONPATH"] = os.pathsep.join([_triton36(), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-m", "fusedpref._aot"], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    versions = {r["triton"] for r in rows}
    assert len(versions) == 1 and (request.param != "3.6" or versions == {"3.6.0"}), versions
    return rows


def test_every_kernel_arch_dtype_variant_compiles(compiled):
    got = {(r["kernel"], r["arch"], r["dtype"], r["variant"]) for r in compiled}
    want = {(k, a, d, v) for k in EXPECTED_KERNELS for a in ("sm_80", "sm_90")
            for d in ("float32", "float16", "bfloat16") for v in ("general", "spec")}
    assert want <= got, sorted(want - got)


def test_no_register_spills_and_a_register_margin(compiled):
    spills = [r for r in compiled if r["stack"] or r["local"]]
    assert not spills, spills
    tight = [r for r in compiled if not 0 < r["reg"] <= REG_LIMIT]
    assert not tight, tight


# the frozen forward's and the kept path's elementwise passes have no matmul
NO_DOT = {"chunk_probs_stats", "chunk_kl_probs_stats", "kept_dz", "kept_dz_q"}


def test_sm90_uses_wgmma(compiled):
    missing = [r for r in compiled if r["arch"] == "sm_90" and not r["wgmma"] and r["kernel"] not in NO_DOT]
    assert not missing, missing
    assert any(r["arch"] == "sm_90" for r in compiled)
