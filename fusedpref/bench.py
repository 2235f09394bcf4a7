"""Benchmark of the fused linear log-prob primitive against eager PyTorch (full logits).

    python -m fusedpref.bench [--n 16384 --d 4096 --v 128256 --dtype bfloat16] [--csv FILE]

On CUDA: triton.testing.do_bench, peak memory from torch.cuda.max_memory_allocated. On the CPU:
median wall time of a few repeats (peak memory is not measured in-process there; see
tests/test_memory.py). Errors are against the float64 oracle at a small shape.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import subprocess
import time

import torch

import fusedpref
from fusedpref.reference import as_float64, eager_logprobs

PROVIDERS = ("eager", "fused")


def _commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _timer(device):
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100)

    def cpu(fn, reps=3):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return cpu


def _fn(provider, backend):
    if provider == "eager":
        return lambda h, w, y: eager_logprobs(h, w, y)
    return lambda h, w, y: fusedpref.linear_logprobs(h, w, y, backend=backend)


def matmul_tflops(device, dtype):
    """The machine's measured dense matmul rate in this dtype (8192^3, or 2048^3 on the CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = _timer(device)(lambda: a @ b)
    return 2 * n ** 3 / ms / 1e9


def errors(provider, backend, device, dtype):
    """max |err| of logp, dH, dW against the float64 oracle at a small shape."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 256, 512, 4096
    h0 = torch.randn(n, d, generator=g).to(dtype).to(device)
    w0 = (torch.randn(v, d, generator=g) * 0.05).to(dtype).to(device)
    y = torch.randint(0, v, (n,), generator=g).to(device)
    gr = torch.randn(n, generator=g).to(device)
    h, w = (t.clone().requires_grad_() for t in (h0, w0))
    out = _fn(provider, backend)(h, w, y)
    out.backward(gr)
    ho, wo = as_float64(h0.requires_grad_(), w0.requires_grad_())
    ref = eager_logprobs(ho, wo, y)
    ref.backward(gr.double())
    return [(a.double() - b).abs().max().item() for a, b in ((out, ref), (h.grad, ho.grad), (w.grad, wo.grad))]


def run(n, d, v, dtype, device, ignore_frac=0.0, providers=PROVIDERS):
    backend = "triton" if device.type == "cuda" else "torch"
    timer = _timer(device)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).to(dtype).to(device).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.02).to(dtype).to(device).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore_frac] = -100
    y = y.to(device)
    gr = torch.randn(n, generator=g).to(device)
    nv = int((y != -100).sum())
    flops = 8 * nv * d * v
    peak = matmul_tflops(device, dtype)
    rows = []
    for provider in providers:
        f = _fn(provider, backend)

        def fwd():
            return f(h, w, y)

        def fwd_bwd():
            h.grad = w.grad = None
            fwd().backward(gr)

        try:
            t_fwd = timer(fwd)
            t_all = timer(fwd_bwd)
            mem = float("nan")
            if device.type == "cuda":
                h.grad = w.grad = None
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fwd_bwd()
                torch.cuda.synchronize()
                grads = h.grad.numel() * h.grad.element_size() + w.grad.numel() * w.grad.element_size()
                mem = (torch.cuda.max_memory_allocated() - base - grads) / 2**20
            err = errors(provider, backend, device, dtype)
            status = "ok"
        except torch.OutOfMemoryError:
            t_fwd = t_all = mem = float("nan")
            err = [float("nan")] * 3
            status = "OOM"
        torch.cuda.empty_cache() if device.type == "cuda" else None
        rows.append({
            "provider": provider if provider == "eager" else f"fused-{backend}",
            "fwd_ms": t_fwd, "bwd_ms": t_all - t_fwd, "fwd_bwd_ms": t_all,
            "extra_mem_mb": mem, "tflops": flops / t_all / 1e9 if t_all == t_all else float("nan"),
            "matmul_peak_tflops": peak, "ideal_ratio": (t_all / (flops / peak / 1e9)) if t_all == t_all else float("nan"),
            "err_logp": err[0], "err_dh": err[1], "err_dw": err[2], "status": status,
        })
    meta = {"date": datetime.date.today().isoformat(), "commit": _commit(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "triton": _triton_version(), "n": n, "n_valid": nv, "d": d,
            "v": v, "dtype": str(dtype).split(".")[1]}
    return [{**meta, **r} for r in rows]


def _triton_version():
    try:
        import triton

        return triton.__version__
    except Exception:
        return "none"


def print_table(rows):
    cols = ["provider", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "extra_mem_mb", "tflops", "ideal_ratio",
            "err_logp", "err_dh", "err_dw", "status"]
    r0 = rows[0]
    print(f"# {r0['date']} {r0['device']} commit {r0['commit']} torch {r0['torch']} triton {r0['triton']}")
    print(f"# N={r0['n']} (valid {r0['n_valid']}) D={r0['d']} V={r0['v']} {r0['dtype']}; "
          f"matmul peak {r0['matmul_peak_tflops']:.1f} TFLOP/s; ideal_ratio = time / (8*Nv*D*V at peak)")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--n", type=int, default=16384 if cuda else 1024)
    p.add_argument("--d", type=int, default=4096 if cuda else 512)
    p.add_argument("--v", type=int, default=128256 if cuda else 32000)
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32",
                   choices=["float32", "float16", "bfloat16"])
    p.add_argument("--ignore-frac", type=float, default=0.0)
    p.add_argument("--csv", default=None)
    a = p.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    rows = run(a.n, a.d, a.v, getattr(torch, a.dtype), device, a.ignore_frac)
    print_table(rows)
    if a.csv:
        new = not os.path.exists(a.csv)
        with open(a.csv, "a", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                wr.writeheader()
            wr.writerows(rows)


if __name__ == "__main__":
    main()
