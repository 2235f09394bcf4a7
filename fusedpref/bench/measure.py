"""Timing and peak memory of one provider, and the per-provider worker processes (a crash, an OOM
or --timeout stops that provider alone)."""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

from .providers import TRAINABLE, errors, flop_count, is_expo, loss_fn, make_inputs, split_variant


# ----------------------------------------------------------------------------- measuring

def _median_ms(fn, reps, warmup=True):
    if warmup:
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(provider, shape, dtype, device, loss_type, beta, reps, frozen=False, prompt_frac=0.5):
    """fwd/bwd/total ms and extra memory (MB) of one provider at one shape (in this process)."""
    h, w, y, r = make_inputs(*shape, dtype, device, prompt_frac, ref_head=is_expo(loss_type))
    frozen = frozen and split_variant(provider)[1] != TRAINABLE
    h.requires_grad_()
    w.requires_grad_(not frozen)
    fn = loss_fn(provider, loss_type, beta)
    grads_mb = (h.numel() * h.element_size() + (0 if frozen else w.numel() * w.element_size())) / 2**20

    def fwd():
        return fn(h, w, y, r)

    def fwd_bwd():
        h.grad = w.grad = None
        fwd().backward()

    if device.type == "cuda":
        import triton.testing

        t_fwd = triton.testing.do_bench(fwd, warmup=10, rep=max(50, 20 * reps))
        t_all = triton.testing.do_bench(fwd_bwd, warmup=10, rep=max(50, 20 * reps))
        h.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        # the peak-RSS mark is reset first (Linux), so earlier peaks in this process do not hide
        # this measurement; the measured run is also the warm-up of the timed ones
        base = _reset_peak_rss_mb()
        fwd_bwd()
        peak = _peak_rss_mb() - base
        t_fwd = _median_ms(lambda: fwd().detach(), reps, warmup=False)
        t_all = _median_ms(fwd_bwd, reps, warmup=False)
    # bwd_ms is the difference of two medians; for Liger, whose forward already computes the
    # gradients, it is ~0 and clamped there (its fwd_ms is its whole forward+backward)
    return {"n_valid": int((y != -100).sum()), "fwd_ms": t_fwd, "bwd_ms": max(0.0, t_all - t_fwd),
            "fwd_bwd_ms": t_all, "peak_mb": peak,
            "extra_mb": peak - grads_mb,
            "flops": flop_count(y, shape[2], shape[3], is_expo(loss_type), frozen), "frozen": frozen}


def _status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(field)


def _reset_peak_rss_mb():
    """Resets the process's peak-RSS mark (writing 5 to /proc/self/clear_refs) and returns the
    current RSS in MB; where that is not possible, returns the lifetime peak (ru_maxrss)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mb("VmRSS")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss_mb():
    try:
        return _status_mb("VmHWM")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker_env():
    # large blocks are mmap'd and returned to the OS on free, so peak RSS follows live tensors
    return dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", PYTHONUNBUFFERED="1")


def run_provider(provider, jobs, dtype, device, loss_type, beta, frozen, prompt_frac, timeout, on_result):
    """Measures one provider at every (shape, repeats, with_errors) of `jobs` in one fresh worker
    process, calling on_result(index, result) as each finishes. A provider that crashes, runs out
    of memory or passes `timeout` seconds marks its remaining jobs and leaves the others alone."""
    spec = json.dumps({"provider": provider, "jobs": jobs, "dtype": str(dtype).split(".")[1],
                       "device": device.type, "loss_type": loss_type, "beta": beta, "frozen": frozen,
                       "prompt_frac": prompt_frac})
    proc = subprocess.Popen([sys.executable, "-m", "fusedpref.bench", "--_worker", spec],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_worker_env())
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    done = set()
    try:
        for line in proc.stdout:
            if line.startswith("{"):
                msg = json.loads(line)
                done.add(msg["i"])
                on_result(msg["i"], msg["result"])
        err = proc.stderr.read()
        proc.wait()
    finally:
        timer.cancel()
    if len(done) < len(jobs):
        why = "timeout" if not timer.is_alive() and proc.returncode in (-9, 137) else \
            "error: " + (err.strip().splitlines() or ["worker died"])[-1][:120]
        for i in range(len(jobs)):
            if i not in done:
                on_result(i, {"status": why})


def _worker(spec):
    s = json.loads(spec)
    device, dtype = torch.device(s["device"]), getattr(torch, s["dtype"])
    torch.manual_seed(0)
    # the error check at a small shape runs first: it also pays the provider's one-time costs
    # (imports, lazy initialisation, compilation of the small shape) outside the measurements
    try:
        errs = dict(zip(("err_loss", "err_dh", "err_dw"),
                        errors(s["provider"], dtype, device, s["loss_type"], s["beta"])))
    except Exception as exc:  # a provider that cannot run the small shape
        errs = {"status": f"error: {type(exc).__name__}: {exc}"[:120]}
    for i, (shape, reps, with_errors) in enumerate(s["jobs"]):
        try:
            res = measure(s["provider"], tuple(shape), dtype, device, s["loss_type"], s["beta"], reps,
                          s["frozen"], s["prompt_frac"])
        except torch.OutOfMemoryError:
            res = {"status": "OOM"}
        except Exception as exc:  # reported in the table; the other jobs go on
            res = {"status": f"error: {type(exc).__name__}: {exc}"[:120]}
        if with_errors:
            res = {**errs, **res} if "status" not in errs else {**res, **errs}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        gc.collect()
        print(json.dumps({"i": i, "result": res}), flush=True)



def matmul_tflops(device, dtype):
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    if device.type == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(lambda: a @ b)
    else:
        ms = _median_ms(lambda: a @ b, 3)
    return 2 * n ** 3 / ms / 1e9
