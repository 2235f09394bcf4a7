"""Ahead-of-time compilation of every kernel for sm_80 / sm_90 without a GPU.

    python -m fusedpref._aot            # prints one JSON line per (kernel, arch, dtype)

Used by tests/test_aot.py (in a subprocess: the interpreter must be off) to prove each kernel
compiles with the configs of fusedpref.config, spills no registers, and uses wgmma on sm_90.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch

_TT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _specs(arch: int, dtype: torch.dtype):
    """(name, kernel, signature, constexprs, launch options) for every kernel launch kind."""
    from . import config, kernels, schedule

    t = _TT[dtype]
    cfg = {k: config.TILES[(k, arch, dtype)]
           for k in ("fwd", "fwd_stats", "dz", "dz_stats", "mm", "kl_fwd", "kl_fwd_stats", "kl_dz", "logits", "probs")}
    mt = cfg["mm"]
    head = {"h_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}", "y_ptr": "*i64"}
    strides = {"stride_hn": "i32", "stride_hd": "constexpr", "stride_wv": "i32", "stride_wd": "constexpr"}
    unit = {"stride_hd": 1, "stride_wd": 1}
    flags = {"HAS_BIAS": True, "HAS_SOFTCAP": True, "HAS_SCALE": True, "DOT_FP32": False}
    xf = {"softcap": "fp32", "scale": "fp32"}
    for stats in (False, True):
        sig = {**head, "part_ptr": "*fp32", "arg_ptr": "*i32", "N": "i32", "V": "i32", "D": "i32",
               "v_per_split": "i32", "n_splits": "i32", **strides, **xf}
        lt = cfg["fwd_stats" if stats else "fwd"]
        const = {**unit, **flags, "STATS": stats, **lt.constexprs()}
        yield (f"logprob_fwd{'_stats' if stats else ''}", kernels.logprob_fwd_kernel, sig, const, lt.launch())
    sig = {**head, "lse_ptr": "*fp32", "g_ptr": "*fp32", "gst_ptr": "*fp32", "st_ptr": "*fp32", "dz_ptr": f"*{t}",
           "db_ptr": "*fp32", "N": "i32", "V": "i32", "D": "i32", "v_lo": "i32", "n_cols": "i32", **strides,
           "stride_dzn": "i32", "stride_dbn": "i32", **xf}
    for stats in (False, True):   # log-prob gradient; + the statistics' gradient (entropy bonus)
        dt_ = cfg["dz_stats" if stats else "dz"]
        yield (f"logprob_dz{'_stats' if stats else ''}", kernels.logprob_dz_kernel, sig,
               {**unit, **flags, "STATS_GRAD": stats, "HAS_DB": True, "GROUP_M": schedule.GROUP_M,
                **dt_.constexprs()}, dt_.launch())
    sig = {"a_ptr": f"*{t}", "b_ptr": f"*{t}", "c_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
           "stride_am": "i32", "stride_ak": "constexpr", "stride_bk": "i32", "stride_bn": "constexpr",
           "stride_cm": "i32", "stride_cn": "constexpr"}
    sig = {"a_ptr": f"*{t}", "b_ptr": f"*{t}", "c_ptr": "*fp32", "s_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
           "stride_am": "i32", "stride_ak": "constexpr", "stride_bk": "i32", "stride_bn": "constexpr",
           "stride_cm": "i32", "stride_cn": "constexpr"}
    for scaled in (False, True):   # dH += dz W; the frozen forward's acc = s acc + P W
        const = {"stride_ak": 1, "stride_bn": 1, "stride_cn": 1, "BLOCK_M": mt.BLOCK_N, "BLOCK_N": mt.BLOCK_V,
                 "BLOCK_K": mt.BLOCK_D, "GROUP_M": schedule.GROUP_M, "DOT_FP32": False, "ROW_SCALE": scaled}
        yield (f"mm_acc{'_scaled' if scaled else ''}", kernels.mm_acc_kernel, sig, const, mt.launch())
    # the frozen-head forward (kernels/frozen.py): chunk logits, then the chunk's probabilities
    dzt = cfg["logits"]
    sig = {**head, "z_ptr": "*fp32", "tmax_ptr": "*fp32", "N": "i32", "V": "i32", "D": "i32", "v_lo": "i32",
           "n_cols": "i32", **strides, "stride_zn": "i32", **xf}
    sig.pop("y_ptr")
    yield ("chunk_logits", kernels.chunk_logits_kernel, sig,
           {**unit, **flags, "GROUP_M": schedule.GROUP_M, **dzt.constexprs()}, dzt.launch())
    probs = {"softcap": "fp32", "scale": "fp32"}
    pt = cfg["probs"]
    pc = {"HAS_SOFTCAP": True, "HAS_SCALE": True, "STATS": True, "BLOCK_N": pt.BLOCK_N, "BLOCK_V": pt.BLOCK_V}
    sig = {"z_ptr": "*fp32", "y_ptr": "*i64", "m_ptr": "*fp32", "p_ptr": f"*{t}", "part_ptr": "*fp32",
           "arg_ptr": "*i32", "N": "i32", "v_lo": "i32", "n_cols": "i32", "n_tiles": "i32", "stride_zn": "i32",
           "stride_pn": "i32", **probs}
    yield ("chunk_probs_stats", kernels.chunk_probs_kernel, sig, pc, {"num_warps": pt.num_warps})
    sig = {"z_ptr": "*fp32", "r_ptr": "*fp32", "y_ptr": "*i64", "mz_ptr": "*fp32", "mr_ptr": "*fp32",
           "p_ptr": f"*{t}", "q_ptr": f"*{t}", "part_ptr": "*fp32", "arg_ptr": "*i32", "N": "i32", "v_lo": "i32",
           "n_cols": "i32", "n_tiles": "i32", "stride_zn": "i32", "stride_pn": "i32", **probs}
    yield ("chunk_kl_probs_stats", kernels.chunk_kl_probs_kernel, sig, pc, {"num_warps": pt.num_warps})
    sig = {"p_ptr": f"*{t}", "q_ptr": f"*{t}", "a_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*i64", "gy_ptr": "*fp32",
           "db_ptr": "*fp32", "N": "i32", "v_lo": "i32", "n_cols": "i32", "n_tiles": "i32", "stride_pn": "i32",
           "stride_dbn": "i32"}
    for two in (False, True):   # the gradients-in-forward path's dz from kept P (and Q, EXPO)
        yield (f"kept_dz{'_q' if two else ''}", kernels.kept_dz_kernel, sig,
               {"BLOCK_N": pt.BLOCK_N, "BLOCK_V": pt.BLOCK_V, "HAS_Q": two, "HAS_DB": True},
               {"num_warps": pt.num_warps})
    ref = {"rh_ptr": f"*{t}", "rw_ptr": f"*{t}", "rb_ptr": f"*{t}"}
    rstrides = {"stride_rhn": "i32", "stride_rhd": "constexpr", "stride_rwv": "i32", "stride_rwd": "constexpr"}
    kl_flags = {**flags, "HAS_REF_BIAS": True, "HAS_REF_SOFTCAP": True, "HAS_REF_SCALE": True,
                "REF_DOT_FP32": False, "stride_rhd": 1, "stride_rwd": 1, **unit}
    two = {**xf, "ref_softcap": "fp32", "ref_scale": "fp32"}
    pair = {"h_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}", **ref}
    # plain KL (linear_kl); KL + both log-probs (linear_logprobs_kl); + the policy's stats (EXPO's
    # pass); the reverse KL and the JSD's first pass with the student's statistics (distillation)
    for suffix, kl_dir, logp, stats in (("", 0, False, False), ("_logp", 0, True, False),
                                        ("_logp_stats", 0, True, True), ("_rev_stats", 1, True, True),
                                        ("_jsd_stats", 2, True, True)):
        kt = cfg["kl_fwd_stats" if stats else "kl_fwd"]
        sig = {**pair, "y_ptr": "*i64", "part_ptr": "*fp32", "arg_ptr": "*i32", "N": "i32", "V": "i32", "D": "i32",
               "RD": "i32", "v_per_split": "i32", "n_splits": "i32", **strides, **rstrides, **two}
        yield (f"kl_fwd{suffix}", kernels.kl_fwd_kernel, sig,
               {**kl_flags, "DIV": kl_dir, "LOGP": logp, "STATS": stats, **kt.constexprs()}, kt.launch())
    kt = cfg["kl_fwd"]
    sig = {**pair, "lse_ptr": "*fp32", "rlse_ptr": "*fp32", "part_ptr": "*fp32", "N": "i32", "V": "i32", "D": "i32",
           "RD": "i32", "v_per_split": "i32", "n_splits": "i32", **strides, **rstrides, **two, "beta": "fp32",
           "log_1mb": "fp32", "log_b": "fp32"}
    yield ("jsd_fwd", kernels.jsd_fwd_kernel, sig, {**kl_flags, **kt.constexprs()}, kt.launch())
    kt = cfg["kl_dz"]
    # KL gradient; KL + log-prob gradient in one dz; + the stats' gradient; reverse KL and JSD
    for suffix, div, logp, stats in (("", 0, False, False), ("_logp", 0, True, False),
                                     ("_logp_stats", 0, True, True), ("_rev_stats", 1, False, True),
                                     ("_jsd_stats", 2, False, True)):
        sig = {**pair, "lse_ptr": "*fp32", "rlse_ptr": "*fp32", "g_ptr": "*fp32", "aux_ptr": "*fp32",
               "y_ptr": "*i64", "glp_ptr": "*fp32", "gst_ptr": "*fp32", "st_ptr": "*fp32", "dz_ptr": f"*{t}",
               "db_ptr": "*fp32", "N": "i32", "V": "i32", "D": "i32", "RD": "i32", "v_lo": "i32",
               "n_cols": "i32", **strides, **rstrides, "stride_dzn": "i32", "stride_dbn": "i32", **two,
               "beta": "fp32", "log_1mb": "fp32", "log_b": "fp32"}
        yield (f"kl_dz{suffix}", kernels.kl_dz_kernel, sig,
               {**kl_flags, "DIV": div, "LOGP": logp, "STATS_GRAD": stats, "HAS_DB": True,
                "GROUP_M": schedule.GROUP_M, **kt.constexprs()}, kt.launch())


def _resource_usage(cubin: bytes) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    return {k: int(v) for k, v in zip(("reg", "stack", "shared", "local"), m.groups())}


# The two binaries of each kernel that are checked:
#   general  bias, soft-cap and logit scale on (both heads); pointers 16-byte aligned, strides and hidden sizes divisible
#            by 16 (row counts and vocabulary sizes arbitrary)
#   spec     what the JIT builds at the main shape (N=16384, D=4096, V=128256, no bias, no
#            soft-cap): every integer argument divisible by 16 except the split count
VARIANTS = ("general", "spec")
_OFF = ("HAS_BIAS", "HAS_SOFTCAP", "HAS_SCALE", "HAS_REF_BIAS", "HAS_REF_SOFTCAP", "HAS_REF_SCALE")


def compile_one(job):
    arch, dtype_name, index, variant = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    dtype = getattr(torch, dtype_name)
    name, fn, sig, const, launch = list(_specs(arch, dtype))[index]
    if variant == "spec":
        const = {k: (False if k in _OFF else v) for k, v in const.items()}
        aligned = {k for k, ty in sig.items() if ty == "i32" and k != "n_splits"}
    else:
        aligned = {"D", "RD", "v_per_split", "v_lo"} | ({"N"} if name.startswith("mm_acc") else set())
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, ty in sig.items()
             if ty.startswith("*") or (ty != "constexpr" and (k.startswith("stride_") or k in aligned))}
    src = ASTSource(fn, sig, const, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch * 10, 32), options=launch)
    usage = _resource_usage(compiled.asm["cubin"])
    return {"kernel": name, "variant": variant, "arch": f"sm_{arch}0", "dtype": dtype_name,
            "triton": triton.__version__, "wgmma": "wgmma" in compiled.asm["ptx"],
            "shared_bytes": compiled.metadata.shared, **usage}


def jobs():
    out = []
    for arch in (8, 9):
        for dtype in _TT:
            n = len(list(_specs(arch, dtype)))
            out += [(arch, str(dtype).split(".")[1], i, v) for i in range(n) for v in VARIANTS]
    return out


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: AOT compilation needs the real compiler", file=sys.stderr)
        return 2
    workers = max(1, min(4, os.cpu_count() or 1))
    with ProcessPoolExecutor(workers) as pool:
        for row in pool.map(compile_one, jobs()):
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
