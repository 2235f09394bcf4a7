"""The GPU check's own steps (bench/gpu_check.sh runs them; `--dry-run` runs the same flow on the
CPU at tiny shapes through the Triton interpreter, which the test suite does).

    python -m fusedpref.gpucheck smoke   [--dry-run]   one verdict line per kernel path x dtype x shape
    python -m fusedpref.gpucheck kernels [--dry-run]   per-kernel ms beside a cuBLAS GEMM of the same FLOPs

smoke: every primitive (log-probs with and without statistics, KL, log-probs + KL in one pass),
forward and backward, in bf16, fp16 and fp32, at a misaligned shape and at the main shape, on
the Triton backend against the torch backend (cuBLAS chunks, fp32 math) with a synchronise after
each, so an illegal address, a compile failure or an accuracy miss (e.g. tf32x3) is localised to
one line. The tolerance is relative to the values' scale: 2e-2 for 16-bit, 1e-4 for fp32.

kernels: at the main shape, the forward kernel, then for backward chunk widths of 1024-16384
columns the dz kernel, the dW GEMM (cuBLAS) and the dH accumulation (mm_acc) of one chunk, each
beside torch.mm of the same FLOPs in the same run ("% of GEMM"), with `fusedpref roofline`'s
modelled lower bound; then fused-triton against fused-torch end to end, the measurement the
`backend="auto"` default follows; the frozen head's two paths; and the trainable head inside a
loss: preference_loss (sigmoid, precomputed reference) with its gradients in forward (6 N D V)
and on the recompute path (8), beside torch's F.linear_cross_entropy and QuACK's chunked linear
cross-entropy (quack-kernels, when installed) on the same rows (their reduction="sum", 6 N D V),
each with its peak memory above the inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

MAIN = (16384, 4096, 128256)
MISALIGNED = (1000, 200, 5003)
DRY = {"main": (64, 48, 1009), "misaligned": (37, 24, 301)}


def _timer(device):
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=5, rep=40)

    def cpu(fn):
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return cpu


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _inputs(n, d, v, dtype, device, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype).to(device)
    w = (torch.randn(v, d, generator=g) / d ** 0.5 * 2).to(dtype).to(device)
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.1] = -100
    return h, w, y.to(device), torch.randn(n, generator=g).to(device)


def _rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1)).item()


def _one_rank_group(device):
    """A one-rank process group (NCCL on CUDA, gloo on the CPU) for the vocabulary-parallel paths
    (their collectives and index work on the device), or None where torch.distributed cannot start."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return dist.group.WORLD
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                                init_method=f"tcp://127.0.0.1:{port}")
    except Exception as exc:  # reported by the smoke lines that need it
        print(f"smoke: no process group ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None
    return dist.group.WORLD


def smoke(dry_run=False, out=print):
    import torch

    import fusedpref

    device = torch.device("cpu" if dry_run else "cuda")
    group = _one_rank_group(device)
    shapes = DRY if dry_run else {"misaligned": MISALIGNED, "main": MAIN}
    ok = True
    for shape_name, (n, d, v) in shapes.items():
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            h, w, y, g = _inputs(n, d, v, dtype, device)
            rh, rw, _, g2 = _inputs(n, d, v, dtype, device, seed=1)
            paths = {
                "logprobs": lambda b, h, w: (fusedpref.linear_logprobs(h, w, y, backend=b),),
                "logprobs+stats": lambda b, h, w: fusedpref.LinearLogProbs.apply(h, w, y, None, -100, None, b, True),
                "kl": lambda b, h, w: (fusedpref.linear_kl(h, w, rh, rw, y, backend=b),),
                "logprobs+kl": lambda b, h, w: fusedpref.linear_logprobs_kl(h, w, rh, rw, y, backend=b)[::2],
            }
            if shape_name == "misaligned":   # the divergence modes, the statistics' gradient, frozen heads
                # (the statistics detached: with a gradient on them the frozen path recomputes)
                paths["frozen"] = lambda b, h, w: [t.detach() if i else t for i, t in enumerate(
                    fusedpref.LinearLogProbs.apply(h, w.detach(), y, None, -100, 20.0, b, True, 1 / 0.7))]
                paths["frozen+kl"] = lambda b, h, w: fusedpref.linear_logprobs_kl(h, w.detach(), rh, rw, y,
                                                                                  backend=b)[::2]
                paths["jsd+stats"] = lambda b, h, w: fusedpref.LinearDivergence.apply(
                    h, w, rh, rw, y, None, None, -100, b, 0.5, None, 8.0, 1 / 0.7, None, True)
                paths["rkl+cap"] = lambda b, h, w: (fusedpref.linear_divergence(
                    h, w, rh, rw, y, beta=1.0, softcap=20.0, temperature=0.8, backend=b),)
                # vocabulary-parallel (a one-rank group: the partials' merge, the collectives on the device)
                paths["vp:lp+kl+stats"] = lambda b, h, w: fusedpref.LinearLogProbsKL.apply(
                    h, w, rh, rw, y, None, None, -100, None, b, True, group)[::3]
                paths["vp:frozen"] = lambda b, h, w: (fusedpref.linear_logprobs(
                    h, w.detach(), y, softcap=20.0, backend=b, process_group=group),)
                # a loss with its gradients in forward (kept P, kept_dz_kernel), one pair; and EXPO's
                # two kept heads (P and Q)
                m = n - n % 2
                paths["loss:in-forward"] = lambda b, h, w: (fusedpref.preference_loss(
                    h[:m].reshape(2, m // 2, -1), w, y[:m].reshape(2, -1), ref_logps=torch.zeros(2, device=device),
                    backend=b, grad_in_forward=True)[0],)
                paths["expo:in-forward"] = lambda b, h, w: (fusedpref.preference_loss(
                    h[:m].reshape(2, m // 2, -1), w, y[:m].reshape(2, -1), loss_type="expo",
                    ref_hidden=rh[:m].reshape(2, m // 2, -1), ref_weight=rw, backend=b, grad_in_forward=True)[0],)
            for name, fn in paths.items():
                t0 = time.perf_counter()
                try:
                    res = {}
                    for backend in ("triton", "torch"):
                        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
                        outs = fn(backend, hh, ww)
                        # the statistics [n, 4] get g2 on every column (the entropy's gradient too)
                        grads = torch.autograd.grad(sum((o.float() * (g if i == 0 else g2.view(-1, *[1] * (o.dim() - 1))
                                                                      )).sum()
                                                        for i, o in enumerate(outs[:2]) if o.requires_grad),
                                                    (hh, ww), allow_unused=True)
                        grads = [x for x in grads if x is not None]
                        _sync(device)
                        res[backend] = [o.detach() for o in outs] + list(grads)
                    errs = [_rel_err(a, b) for a, b in zip(res["triton"], res["torch"])]
                    worst = max(errs)
                    verdict = "ok" if worst <= tol else "ACCURACY"
                    ok &= verdict == "ok"
                    out(f"smoke {shape_name:10s} {str(dtype).split('.')[1]:8s} {name:14s} {verdict:8s} "
                        f"max rel err {worst:.2e} (tol {tol:g})  {time.perf_counter() - t0:.1f} s")
                except Exception as exc:  # one failing path must not hide the others
                    ok = False
                    out(f"smoke {shape_name:10s} {str(dtype).split('.')[1]:8s} {name:14s} FAILED   "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                    traceback.print_exc(file=sys.stderr)
                    _try_recover(device)
    return ok


def _try_recover(device):
    import torch

    if device.type == "cuda":
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception:   # an illegal address poisons the context; later lines will say so
            pass


def kernels(dry_run=False, out=print, csv_path=None):
    """Per-kernel timing beside cuBLAS; rows also appended as JSON lines to csv_path."""
    import torch
    import triton

    from . import _partials, config, ops, schedule
    from ._spec import Head, Transform

    device = torch.device("cpu" if dry_run else "cuda")
    n, d, v = DRY["main"] if dry_run else MAIN
    dtype = torch.bfloat16
    h, w, y, g = _inputs(n, d, v, dtype, device)
    y = y.clamp(min=0)                                   # all rows valid
    bench = _timer(device)
    rows = []

    def gemm_ms(m, k, nn):
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, nn, device=device, dtype=dtype)
        return bench(lambda: torch.mm(a, b))

    def row(kernel, ms, flops, gemm, note=""):
        r = {"kernel": kernel, "ms": ms, "tflops": flops / ms / 1e9, "gemm_ms": gemm,
             "pct_of_gemm": 100 * gemm / ms, "note": note}
        rows.append(r)
        out(f"kernel {kernel:34s} {ms:9.3f} ms  {r['tflops']:7.1f} TFLOP/s  cuBLAS same FLOPs {gemm:8.3f} ms "
            f"= {r['pct_of_gemm']:5.1f}% of GEMM  {note}")

    fl = 2 * n * d * v
    head = Head(h, w, None, Transform())
    row("forward logprob_fwd (+stats)", bench(lambda: ops.logprob_partials(head, y, True)), fl, gemm_ms(n, d, v))
    lse = _partials.finish_logprob(*ops.logprob_partials(head, y, False)[:2], y)[1]
    tiles = config.tiles("dz", device, dtype)
    widths = (256, 512) if dry_run else (1024, 4096, 8192, 16384)
    for cols in widths:
        cols = min(cols, v)
        dz = torch.empty((n, cols), dtype=dtype, device=device)
        nb = triton.cdiv(n, tiles.BLOCK_N)

        def run_dz():
            from .kernels import logprob_dz_kernel

            logprob_dz_kernel[(nb * triton.cdiv(cols, tiles.BLOCK_V),)](
                h, w, h, y, lse, g, g, g, dz, lse, n, v, d, 0, cols, h.stride(0), h.stride(1), w.stride(0),
                w.stride(1), dz.stride(0), 0, HAS_BIAS=False, **ops._xf(head), STATS_GRAD=False, HAS_DB=False,
                DOT_FP32=ops._dot_fp32(dtype), GROUP_M=schedule.GROUP_M, **tiles.constexprs(), **tiles.launch())
        fc = 2 * n * d * cols
        gm = gemm_ms(n, d, cols)
        row(f"dz (recompute) chunk {cols}", bench(run_dz), fc, gm)
        dw = torch.empty((cols, d), dtype=dtype, device=device)
        row(f"dW = dz^T H chunk {cols}", bench(lambda: torch.mm(dz.t(), h, out=dw)), fc, gm, "cuBLAS")
        acc = torch.zeros((n, d), dtype=torch.float32, device=device)
        row(f"dH += dz W mm_acc chunk {cols}", bench(lambda: ops._mm_acc(dz, w[:cols], acc)), fc, gm,
            "incl. fp32 accumulator read+write")
    # end to end: the default backend follows this
    import fusedpref

    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    for backend in ("triton", "torch"):
        def step():
            hh.grad = ww.grad = None
            (fusedpref.linear_logprobs(hh, ww, y, backend=backend) * g).sum().backward()
        row(f"end to end fwd+bwd backend={backend}", bench(step), 4 * fl, 4 * rows[0]["gemm_ms"])
    # the frozen head (LoRA): the one-pass path beside the standard one (issue: <= 0.7x)
    hf = h.clone().requires_grad_()
    times = {}
    for path in ("one-pass", "standard"):
        def frozen_step():
            hf.grad = None
            (fusedpref.linear_logprobs(hf, w, y, backend="triton", frozen=path) * g).sum().backward()
        times[path] = bench(frozen_step)
        row(f"frozen head fwd+bwd {path}", times[path], (2 if path == "one-pass" else 3) * fl,
            (2 if path == "one-pass" else 3) * rows[0]["gemm_ms"])
    out(f"kernel frozen head: one-pass / standard = {times['one-pass'] / times['standard']:.2f}x")
    _loss_heads(h, w, y, g, bench, row, fl, rows[0]["gemm_ms"], device, out)
    _, model = schedule.model(n, d, v, "bf16", "H200")
    _, kept = schedule.model(n, d, v, "bf16", "H200", kept=True)
    out(f"kernel roofline (model, H200): total lower bound {model['total_bound_ms']:.1f} ms for fwd+bwd "
        f"({model['splits']} splits, chunk {model['chunk_cols']}); gradients in forward "
        f"{kept['total_bound_ms']:.1f} ms")
    if csv_path:
        with open(csv_path, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "n": n, "d": d, "v": v, "dtype": "bf16", "dry_run": dry_run}) + "\n")
    return rows


def _loss_heads(h, w, y, g, bench, row, fl, gemm_ms, device, out):
    """The trainable head inside a loss at the kernels step's shape (pairs of 4096 rows; the dry run's
    tiny shape: one pair): fusedpref's two paths, torch's and QuACK's linear cross-entropy."""
    import torch

    import fusedpref

    n, d = h.shape
    t = min(2048, n // 2)
    pairs = n // (2 * t)
    hh = h[: 2 * pairs * t].reshape(2 * pairs, t, d).clone().requires_grad_()
    ww = w.clone().requires_grad_()
    yy = y[: 2 * pairs * t].reshape(2 * pairs, t)
    ref = torch.zeros(2 * pairs, device=device)
    cuda = device.type == "cuda"

    def timed(name, step, units, note=""):
        try:
            ms = bench(step)
            extra = ""
            if cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                extra = f", peak {(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MiB above the inputs"
            row(name, ms, units * fl / 2, units * gemm_ms / 2, note + extra)
        except Exception as exc:   # one failing comparator must not hide the others
            out(f"kernel {name:34s} FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")

    for label, gif, units in (("gradients in forward", True, 6), ("recompute", False, 8)):
        def step(gif=gif):
            hh.grad = ww.grad = None
            loss, _ = fusedpref.preference_loss(hh, ww, yy, ref_logps=ref, backend="triton", grad_in_forward=gif)
            loss.backward()
        timed(f"preference_loss {label}", step, units, f"{2 * pairs} x {t} rows")
    flat_h, flat_y = hh.detach().reshape(-1, d).clone().requires_grad_(), yy.reshape(-1)
    if hasattr(torch.nn.functional, "linear_cross_entropy"):
        def torch_step():
            flat_h.grad = ww.grad = None
            torch.nn.functional.linear_cross_entropy(flat_h, ww, flat_y, reduction="sum").backward()
        timed("torch F.linear_cross_entropy sum", torch_step, 6, "gradients in forward (torch >= 2.13)")
    else:
        out("kernel torch F.linear_cross_entropy unavailable (torch < 2.13)")
    try:
        from quack.linear_cross_entropy import chunked_linear_cross_entropy
    except Exception as exc:
        out(f"kernel QuACK chunked_linear_cross_entropy unavailable ({type(exc).__name__}: install quack-kernels)")
        return

    def quack_step():
        flat_h.grad = ww.grad = None
        chunked_linear_cross_entropy(flat_h, ww, flat_y, chunk_size=4096, reduction="sum").backward()
    timed("QuACK chunked_linear_cross_entropy", quack_step, 6, "reduction sum")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fusedpref.gpucheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["smoke", "kernels"])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    p.add_argument("--jsonl", default=None, help="append the kernel rows to this file as JSON lines")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    if a.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        # the interpreter must be chosen before triton is first imported (importing fusedpref does)
        os.execve(sys.executable, [sys.executable, "-m", "fusedpref.gpucheck", *argv],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    if a.step == "smoke":
        return 0 if smoke(a.dry_run) else 1
    kernels(a.dry_run, csv_path=a.jsonl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
