"""`fusedpref bench`: fused preference loss forward+backward against the alternatives.

Providers (each computes the same policy loss on the same inputs; the reference log-probs are
precomputed, as TRL's precompute_ref_log_probs does):
  eager         full logits in the input dtype, log_softmax in fp32, gather (TRL's way)
  compile       torch.compile of the eager loss (on the CPU only when asked for)
  fused-torch   fusedpref, chunked PyTorch backend
  fused-triton  fusedpref, Triton kernels (GPU only)
  trl           TRL's own chunked LM head (trl.kernels.ChunkedLogProbFunction, what DPOTrainer
                patches into the model since TRL 1.16), called as DPOTrainer does: valid rows only,
                with the entropy / mean-logit / top-1 outputs its metrics use (when importable)
  liger         Liger-Kernel's LigerFusedLinearDPOLoss (sigmoid loss only, no reference input;
                when importable; torch.compile'd chunks on GPU as Liger defaults, eager on CPU)
  cce           Cut Cross-Entropy linear_cross_entropy(reduction="none") summed per sequence
                (when importable, GPU)

Each provider runs in its own worker process (a crash, OOM or --timeout stops that provider
alone). On CUDA: triton.testing.do_bench and torch.cuda.max_memory_allocated. On the CPU: median
wall time of a few repeats, and the raise of peak RSS, whose mark is reset before each
measurement (MALLOC_MMAP_THRESHOLD_ set so freed blocks return to the OS). peak_mb is the peak memory above
inputs and weights during forward+backward; extra_mb subtracts the gradients (which every
provider must produce). On the CPU extra_mb is within allocator noise of 0 for small fused runs.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

ALL_PROVIDERS = ("eager", "compile", "fused-torch", "fused-triton", "trl", "liger", "cce")
TRL_CHUNK = 32768   # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16
# the CPU default keeps the run under a minute on 2 cores; compile and liger run there too when
# asked for (--providers)
CPU_DEFAULT_PROVIDERS = ("eager", "fused-torch")


# ----------------------------------------------------------------------------- inputs

def is_expo(loss_type):
    """EXPO/TYPO with its default exact vocabulary KL: needs a reference head, not ref log-probs."""
    from .losses import LOSSES

    return LOSSES[loss_type].fn is LOSSES["expo"].fn and LOSSES[loss_type].params.get("expo_kl") == "vocab"


def make_inputs(pairs, seq, d, v, dtype, device, prompt_frac=0.5, seed=0, ref_head=False):
    """hidden [2B, T, D], weight [V, D], targets [2B, T] (first prompt_frac of each row ignored)
    and the reference: precomputed log-probs [2B], or with ref_head a reference head
    (ref_hidden [2B, T, D], ref_weight [V, D]) for EXPO's vocabulary KL."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * pairs
    hidden = torch.randn(n, seq, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) * (1.0 / d ** 0.5)).to(dtype)
    targets = torch.randint(0, v, (n, seq), generator=g)
    targets[:, : int(seq * prompt_frac)] = -100
    ref = (-torch.rand(n, generator=g) * seq * 2).to(device)
    if ref_head:
        ref = (torch.randn(n, seq, d, generator=g).to(dtype).to(device),
               (torch.randn(v, d, generator=g) * (1.0 / d ** 0.5)).to(dtype).to(device))
    return hidden.to(device), weight.to(device), targets.to(device), ref


def flop_count(targets, d, v, expo=False, frozen=False):
    """The useful matmul work per forward+backward, in units of N_valid * D * V: 8 for a trainable
    head (forward, recompute, dW, dH), 6 frozen; EXPO's one pass over two heads: 12, frozen 10."""
    units = (12 if expo else 8) - (2 if frozen else 0)
    return units * int((targets != -100).sum()) * d * v


# ----------------------------------------------------------------------------- providers

def _pair_loss(seq_logps, ref_logps, targets, loss_type, beta, kl=None):
    from .losses import LOSSES, Pairs

    b = seq_logps.shape[0] // 2
    lengths = (targets != -100).sum(-1).to(seq_logps.dtype).clamp(min=1)
    p = Pairs(seq_logps[:b], seq_logps[b:], ref_logps[:b], ref_logps[b:], lengths[:b], lengths[b:], beta,
              0.0, dict(LOSSES[loss_type].params), None if kl is None else kl[:b], None if kl is None else kl[b:])
    return LOSSES[loss_type].fn(p).mean()


def _eager_loss(hidden, weight, targets, ref, loss_type, beta):
    """Full logits, TRL's way; with a reference head each head's logits are computed once and the
    per-token KL comes from the two full log-softmaxes."""
    from .reference import eager_logits, eager_logprobs

    if not isinstance(ref, tuple):
        return _pair_loss(eager_logprobs(hidden, weight, targets).sum(-1), ref, targets, loss_type, beta)
    rh, rw = ref
    mask = targets != -100
    safe = torch.where(mask, targets, 0).unsqueeze(-1)
    lp = torch.log_softmax(eager_logits(hidden, weight), -1)
    with torch.no_grad():
        lr = torch.log_softmax(eager_logits(rh, rw), -1)
    logps = (lp.gather(-1, safe).squeeze(-1) * mask).sum(-1)
    ref_logps = (lr.gather(-1, safe).squeeze(-1) * mask).sum(-1)
    kl = ((lr.exp() * (lr - lp)).sum(-1) * mask).sum(-1) if is_expo(loss_type) else None
    return _pair_loss(logps, ref_logps, targets, loss_type, beta, kl)


def available(provider, device):
    if provider in ("fused-triton", "cce") and device.type != "cuda":
        return False
    if provider == "liger":
        try:
            import liger_kernel.chunked_loss  # noqa: F401
        except Exception:
            return False
    if provider == "cce":
        try:
            import cut_cross_entropy  # noqa: F401
        except Exception:
            return False
    if provider == "trl":
        try:
            from trl.kernels import ChunkedLogProbFunction  # noqa: F401
        except Exception:
            return False
    return True


def loss_fn(provider, loss_type, beta):
    """A callable (hidden, weight, targets, ref) -> scalar loss; ref as make_inputs returns it."""
    import fusedpref

    if provider == "eager":
        return lambda h, w, y, r: _eager_loss(h, w, y, r, loss_type, beta)
    if provider == "compile":
        # default dynamic-shape policy: the error check's small shape, then one dynamic recompile
        # serves the sweep's shapes
        compiled = torch.compile(_eager_loss)
        return lambda h, w, y, r: compiled(h, w, y, r, loss_type, beta)
    if provider in ("fused-torch", "fused-triton"):
        backend = provider.split("-")[1]

        def fused(h, w, y, r):
            ref = dict(ref_hidden=r[0], ref_weight=r[1]) if isinstance(r, tuple) else dict(ref_logps=r)
            return fusedpref.preference_loss(h, w, y, loss_type=loss_type, beta=beta, backend=backend, **ref)[0]
        return fused
    if provider == "trl":
        if is_expo(loss_type):
            raise ValueError("the trl provider gives per-token log-probs only: no vocabulary KL for expo")
        from trl.kernels import ChunkedLogProbFunction

        def trl(h, w, y, r):
            # as trl.trainer.utils.add_fused_lm_head: compacted rows, TRL's vocabulary chunk,
            # DPOTrainer's outputs, scattered back with masked_scatter
            mask = y != -100
            out = ChunkedLogProbFunction.apply(h[mask], w, None, y[mask], 1.0, TRL_CHUNK, None, 1.0,
                                               ("log_probs", "entropy", "mean_logits", "is_top1"))
            tok = out[0].new_zeros(mask.shape).masked_scatter(mask, out[0])
            return _pair_loss(tok.sum(-1), r, y, loss_type, beta)
        return trl
    if provider == "liger":
        if loss_type != "sigmoid":
            raise ValueError("the liger provider is benchmarked with loss_type='sigmoid' only")
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        # Liger takes no precomputed reference log-probs (it runs a reference head or none), so
        # it runs without one: the same work as the others minus the reference subtraction, and
        # its errors are taken against a zero reference (see provider_ref). torch.compile of its
        # chunk step is Liger's default on GPU; on the CPU it would add ~30 s of compilation.
        mod = LigerFusedLinearDPOLoss(beta=beta, use_ref_model=False, compiled=torch.cuda.is_available())

        def liger(h, w, y, r):
            out = mod(w, h, y)
            return out[0] if isinstance(out, tuple) else out
        return liger
    if provider == "cce":
        if is_expo(loss_type):
            raise ValueError("the cce provider gives per-token NLL only: no vocabulary KL for expo")
        from cut_cross_entropy import linear_cross_entropy

        def cce(h, w, y, r):
            nll = linear_cross_entropy(h, w, y, reduction="none", ignore_index=-100)
            return _pair_loss(-nll.float().sum(-1), r, y, loss_type, beta)
        return cce
    raise ValueError(f"unknown provider {provider!r}; choose from {ALL_PROVIDERS}")


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
            "flops": flop_count(y, shape[2], shape[3], is_expo(loss_type), frozen)}


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


def provider_ref(provider, ref_logps):
    """The reference log-probs a provider's loss actually uses (Liger's: none, i.e. zero)."""
    return torch.zeros_like(ref_logps) if provider == "liger" else ref_logps


def errors(provider, dtype, device, loss_type, beta):
    """max |error| of loss, dH, dW against the float64 eager loss at a small shape."""
    from .reference import eager_preference_loss

    shape = (2, 64, 128, 1000)
    h0, w0, y, r = make_inputs(*shape, dtype, device, seed=1, ref_head=is_expo(loss_type))
    fn = loss_fn(provider, loss_type, beta)
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    loss = fn(h, w, y, r)
    dh, dw = torch.autograd.grad(loss, (h, w))
    ho, wo = h0.double().requires_grad_(), w0.double().requires_grad_()
    # the oracle: fusedpref.reference's own derivation of the loss (shares no code with losses.py)
    if isinstance(r, tuple):
        refs = dict(ref_hidden=r[0].double(), ref_weight=r[1].double())
    else:
        refs = dict(ref_logps=provider_ref(provider, r).double())
    ref, _ = eager_preference_loss(ho, wo, y, loss_type=loss_type, beta=beta, **refs)
    rdh, rdw = torch.autograd.grad(ref, (ho, wo))
    return [abs(loss.item() - ref.item()), (dh.double() - rdh).abs().max().item(),
            (dw.double() - rdw).abs().max().item()]


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


# ----------------------------------------------------------------------------- reporting

def _meta(device, dtype):
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "none"
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        commit = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{os.cpu_count()}"
    return {"date": datetime.date.today().isoformat(), "commit": commit, "device": name,
            "torch": torch.__version__, "triton": tv, "dtype": str(dtype).split(".")[1],
            "chunk_mb": os.environ.get("FUSEDPREF_CHUNK_MB", "default")}


def _fmt(x):
    if isinstance(x, float):
        return "nan" if x != x else f"{x:.3g}" if abs(x) < 1e-2 or abs(x) >= 1e4 else f"{x:.4g}"
    return str(x)


# CSV columns first in this order (then any others, sorted): what ran, where, then the figures
CSV_COLS = ["date", "commit", "device", "torch", "triton", "dtype", "chunk_mb", "provider", "status", "sweep",
            "loss_type", "beta", "frozen", "pairs", "seq", "tokens", "n_valid", "d", "v", "fwd_ms", "bwd_ms",
            "fwd_bwd_ms", "peak_mb", "extra_mb", "flops", "tflops", "matmul_peak_tflops", "pct_of_peak", "err_loss",
            "err_dh", "err_dw"]
TABLE_COLS = ["provider", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "peak_mb", "extra_mb", "tflops", "pct_of_peak",
              "err_loss", "err_dh", "err_dw", "status"]


def print_table(rows, meta, shape, peak, n_valid, units, loss_type, beta):
    pairs, seq, d, v = shape
    print(f"# {meta['date']}  {meta['device']}  commit {meta['commit']}  torch {meta['torch']}  "
          f"triton {meta['triton']}  FUSEDPREF_CHUNK_MB={meta['chunk_mb']}")
    print(f"# {pairs} pairs x {seq} tokens ({n_valid} valid), D={d}, V={v}, {meta['dtype']}, loss {loss_type} (beta {beta:g}); "
          f"measured matmul peak {peak:.3g} TFLOP/s; TFLOP/s counts {units}*N_valid*D*V")
    print("| " + " | ".join(TABLE_COLS) + " |")
    print("|" + "---|" * len(TABLE_COLS))
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c, "")) for c in TABLE_COLS) + " |")


def plot(sweep_rows, path, caption=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for prov in sorted({r["provider"] for r in sweep_rows}):
        mem = sorted((r["v"], r["peak_mb"]) for r in sweep_rows if r["provider"] == prov and r["sweep"] == "vocab"
                     and "peak_mb" in r)
        tim = sorted((r["tokens"], r["fwd_bwd_ms"]) for r in sweep_rows if r["provider"] == prov
                     and r["sweep"] == "tokens" and "fwd_bwd_ms" in r)
        if mem:
            a.plot(*zip(*mem), marker="o", label=prov)
        if tim:
            b.plot(*zip(*tim), marker="o", label=prov)
    a.set(xlabel="vocabulary size V", ylabel="peak memory above inputs (MB)", title="memory vs vocabulary")
    b.set(xlabel="tokens (2B x T)", ylabel="forward+backward (ms)", title="time vs tokens")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    if caption:
        fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(argv=None):
    t_start = time.monotonic()
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="fusedpref bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=8 if cuda else 4, help="preference pairs B (default: %(default)s)")
    p.add_argument("--seq", type=int, default=1024 if cuda else 256, help="tokens per sequence T (default: %(default)s)")
    p.add_argument("--d", type=int, default=4096 if cuda else 128, help="hidden size D (default: %(default)s)")
    p.add_argument("--v", type=int, default=128256 if cuda else 32000, help="vocabulary size V (default: %(default)s)")
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=["float32", "float16", "bfloat16"],
                   help="hidden and weight dtype (default: %(default)s)")
    p.add_argument("--prompt-frac", type=float, default=0.5,
                   help="leading fraction of each sequence ignored, as a prompt (default: %(default)s)")
    p.add_argument("--loss-type", default="sigmoid", help="any registered loss (default: %(default)s)")
    p.add_argument("--beta", type=float, default=0.1, help="the loss's beta (default: %(default)s)")
    p.add_argument("--frozen", action="store_true", help="frozen LM head (no dW), the LoRA case")
    p.add_argument("--providers", default=",".join(ALL_PROVIDERS if cuda else CPU_DEFAULT_PROVIDERS),
                   help="comma-separated subset of " + ",".join(ALL_PROVIDERS) + " (unavailable ones are "
                   "skipped; default: all on GPU, " + ",".join(CPU_DEFAULT_PROVIDERS) + " on the CPU)")
    p.add_argument("--repeats", type=int, default=2 if not cuda else 5,
                   help="timed repeats per measurement on the CPU; do_bench's budget on a GPU (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=900,
                   help="seconds one provider may take for all its shapes before it is stopped")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run: each provider gets at most what is left (the table "
                        "and files are always written; providers left without time say so)")
    p.add_argument("--no-sweep", action="store_true", help="skip the memory-vs-V and time-vs-tokens sweep")
    p.add_argument("--out", default=None, help="folder for the CSV and PNG (default: a new folder "
                   "out/bench-<UTC time>; the committed bench/results/ changes only when named here)")
    p.add_argument("--tag", default=None, help="file name tag (default: the device)")
    a = p.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, a.dtype)
    wanted = [x.strip() for x in a.providers.split(",") if x.strip()]
    for x in wanted:
        if x not in ALL_PROVIDERS:
            p.error(f"unknown provider {x!r}; choose from {', '.join(ALL_PROVIDERS)}")
    from .losses import check_loss_args

    try:
        check_loss_args(a.loss_type, None, 0.0, a.beta, {})
    except (ValueError, TypeError) as exc:
        p.error(str(exc))
    providers = [x for x in wanted if available(x, device)]
    skipped = [x for x in wanted if x not in providers]
    shape = (a.pairs, a.seq, a.d, a.v)
    meta = _meta(device, dtype)
    peak = matmul_tflops(device, dtype)

    # sweep shapes: vocabulary sizes (memory) and token counts (time), around the default
    sweep = []
    if not a.no_sweep:
        sweep += [("vocab", (a.pairs, a.seq, a.d, v)) for v in (a.v // 4, a.v // 2, a.v)]
        sweep += [("tokens", shape)]
        sweep += [("tokens", (max(1, a.pairs // 4) if cuda else 1, a.seq, a.d, a.v)),
                  ("tokens", (max(1, a.pairs // 2), a.seq, a.d, a.v))]
    # one worker process per provider runs its table shape (with the error check) and its sweep
    kinds = [("table", shape)] + sweep
    plan = {}
    for kind, s in kinds:  # the table shape is also the sweep's middle point: measured once
        plan.setdefault(s, []).append(kind)
    jobs = [(list(s), a.repeats if "table" in ks else 1, "table" in ks) for s, ks in plan.items()]
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is a dev extra
        tqdm = None
    bar = tqdm(total=len(jobs) * len(providers), desc="fusedpref bench", unit="run", file=sys.stderr) \
        if tqdm else None
    rows, sweep_rows = [], []

    def record(prov, i, res):
        s, ks = list(plan.items())[i]
        res = dict(res)
        res.setdefault("status", "ok")
        if "fwd_bwd_ms" in res:
            res["tflops"] = res["flops"] / res["fwd_bwd_ms"] / 1e9
            res["pct_of_peak"] = 100 * res["tflops"] / peak
        for kind in ks:
            row = {**meta, "provider": prov, "pairs": s[0], "seq": s[1], "tokens": 2 * s[0] * s[1],
                   "d": s[2], "v": s[3], "loss_type": a.loss_type, "beta": a.beta, "frozen": a.frozen,
                   "matmul_peak_tflops": peak, "sweep": kind, **res}
            (rows if kind == "table" else sweep_rows).append(row)
        if bar:
            bar.set_postfix_str(prov)
            bar.update(1)

    deadline = None if a.budget is None else t_start + a.budget - 5.0   # 5 s to write the files
    for prov in providers:
        left = None if deadline is None else deadline - time.monotonic()
        timeout = a.timeout if left is None else min(a.timeout, left)
        if left is not None and left <= 1.0:
            for i in range(len(jobs)):
                record(prov, i, {"status": "skipped: --budget spent"})
            continue
        run_provider(prov, jobs, dtype, device, a.loss_type, a.beta, a.frozen, a.prompt_frac,
                     timeout, lambda i, res, prov=prov: record(prov, i, res))
    if bar:
        bar.close()
    order = {p: k for k, p in enumerate(providers)}
    rows.sort(key=lambda r: order[r["provider"]])
    n_valid = 2 * a.pairs * (a.seq - int(a.seq * a.prompt_frac))
    units = (12 if is_expo(a.loss_type) else 8) - (2 if a.frozen else 0)
    print_table(rows, meta, shape, peak, n_valid, units, a.loss_type, a.beta)
    if skipped:
        print(f"# skipped (not available here): {', '.join(skipped)}")
    by = {r["provider"]: r for r in rows}
    for fused in ("fused-torch", "fused-triton"):
        if by.get("eager", {}).get("peak_mb", 0) > 0 and by.get(fused, {}).get("peak_mb", 0) > 0:
            print(f"# peak memory above inputs, eager / {fused}: "
                  f"{by['eager']['peak_mb'] / by[fused]['peak_mb']:.1f}x")
    if a.out is None:
        a.out = os.path.join("out", "bench-" + datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S"))
    os.makedirs(a.out, exist_ok=True)
    tag = a.tag or ("cpu" if device.type == "cpu" else meta["device"].replace(" ", "-").lower())
    csv_path = os.path.join(a.out, f"bench-{tag}.csv")
    present = {k for r in rows + sweep_rows for k in r}
    fields = [c for c in CSV_COLS if c in present] + sorted(present - set(CSV_COLS))   # stable, readable order
    with open(csv_path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields)
        wr.writeheader()
        wr.writerows(rows + sweep_rows)
    print(f"# wrote {csv_path}")
    if sweep_rows:
        png = os.path.join(a.out, f"bench-{tag}.png")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("# no plot: matplotlib is not installed (pip install 'fusedpref[bench]')")
        else:
            plot(sweep_rows, png, f"fusedpref bench: {meta['device']}, D={a.d}, V={a.v} (sweep varies V and "
                 f"tokens), {a.dtype}, loss {a.loss_type}, {meta['date']}, commit {meta['commit']}")
            print(f"# wrote {png}")
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_worker"]:
        return _worker(argv[1])
    run(argv)


if __name__ == "__main__":
    main()
