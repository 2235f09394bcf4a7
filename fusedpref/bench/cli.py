"""`fusedpref bench`: the command line, the sweep plan and the run."""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import os
import sys
import time

import torch

from . import __doc__ as BENCH_DOC
from .measure import _worker, matmul_tflops, run_provider
from .providers import ALL_PROVIDERS, CPU_DEFAULT_PROVIDERS, RECOMPUTE, STANDARD, TRAINABLE, available, is_expo
from .report import CSV_COLS, _meta, plot, print_table


def run(argv=None):
    t_start = time.monotonic()
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="fusedpref bench", description=BENCH_DOC,
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
    p.add_argument("--recompute", action="store_true",
                   help="also run each fused provider on the recompute path (grad_in_forward=False), side by side")
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
    p.add_argument("--keep-going", action="store_true",
                   help="exit 0 even when a provider failed (its rows say why); by default a failed, timed-out "
                        "or out-of-memory provider makes the exit status 1")
    a = p.parse_args(argv)
    for flag in ("pairs", "seq", "d", "v", "repeats"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag} must be a whole number >= 1, got {getattr(a, flag)}")
    if not 0 <= a.prompt_frac < 1:
        p.error(f"--prompt-frac must lie in [0, 1) (the fraction of each sequence that is prompt), got {a.prompt_frac}")
    if not a.timeout > 0 or (a.budget is not None and not a.budget > 0):
        p.error("--timeout and --budget must be positive numbers of seconds")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, a.dtype)
    wanted = [x.strip() for x in a.providers.split(",") if x.strip()]
    for x in wanted:
        if x not in ALL_PROVIDERS:
            p.error(f"unknown provider {x!r}; choose from {', '.join(ALL_PROVIDERS)}")
    from ..losses import check_loss_args

    try:
        check_loss_args(a.loss_type, None, 0.0, a.beta, {})
    except (ValueError, TypeError) as exc:
        p.error(str(exc))
    providers = [x for x in wanted if available(x, device)]
    if a.frozen:   # the fused heads' one-pass frozen path beside their standard frozen path and a trainable head
        providers = [v for x in providers
                     for v in ((x, f"{x}:{STANDARD}", f"{x}:{TRAINABLE}") if x.startswith("fused-") else (x,))]
    if a.recompute:   # the fused heads' default (gradients in forward) beside their recompute path
        providers = [v for x in providers for v in ((x, f"{x}:{RECOMPUTE}") if x.startswith("fused-") and ":" not in x
                                                    else (x,))]
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
        one, std, trn = (by.get(k, {}).get("fwd_bwd_ms", 0) for k in (fused, f"{fused}:{STANDARD}",
                                                                      f"{fused}:{TRAINABLE}"))
        if one > 0 and std > 0 and trn > 0:
            print(f"# frozen head, {fused}: one-pass / standard frozen path time {one / std:.2f}x "
                  f"({one:.4g} vs {std:.4g} ms; trainable head {trn:.4g} ms)")
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
        if not _installed("matplotlib"):
            print("# no plot: matplotlib is not installed (pip install 'fusedpref[bench]')")
        else:
            plot(sweep_rows, png, f"fusedpref bench: {meta['device']}, D={a.d}, V={a.v} (sweep varies V and "
                 f"tokens), {a.dtype}, loss {a.loss_type}, {meta['date']}, commit {meta['commit']}")
            print(f"# wrote {png}")
    failed = sorted({r["provider"] for r in rows + sweep_rows if r.get("status", "ok") != "ok"})
    if failed:
        print(f"# failed: {', '.join(failed)} (see their rows)" + ("" if a.keep_going else "; exit status 1 "
                                                                  "(--keep-going: 0)"))
        if not a.keep_going:
            raise SystemExit(1)
    return rows


def _installed(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_worker"]:
        return _worker(argv[1])
    run(argv)
