"""One TRL DPOTrainer step, whole: step time and peak memory with fusedpref's default path
(gradients in forward), fusedpref's recompute path, TRL's own fused head, and an unfused head
(full logits, log_softmax, gather), on the CPU at a shape where the LM head dominates (a 2-layer
Llama of hidden 256 with Llama 3's 128256-token vocabulary, 4 pairs of 256 completion tokens).

Each head runs in its own process: `--steps` optimizer steps (plain SGD, so no optimizer state);
the time is the median of the steps after the first (the first warms up), the memory the rise of
the peak RSS over the run, with MALLOC_MMAP_THRESHOLD_ set so that freed blocks return to the OS.
Kernel gains at this scale are a share of a step; both numbers are what a user sees.

    python bench/trl_step.py [--vocab 128256] [--hidden 256] [--tokens 256] [--pairs 4] [--steps 4]
                             [--kept-mb 1024] [--bf16] [--heads fusedpref,recompute,trl,unfused]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADS = {"fusedpref": "fusedpref (patch_trl), gradients in forward",
         "recompute": "fusedpref (patch_trl), recompute path",
         "trl": "TRL's ChunkedLogProbFunction",
         "unfused": "unfused (full logits, log_softmax)"}


class UnfusedHead:
    """TRL's per-token head interface computed the plain way: the [N, V] logits exist (and
    autograd keeps them and their softmax for backward)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        import torch

        logits = torch.nn.functional.linear(hidden, weight, bias).float() * logit_scale
        if final_logit_softcapping is not None:
            logits = final_logit_softcapping * torch.tanh(logits / final_logit_softcapping)
        logp = (logits / temperature).log_softmax(-1)
        safe = targets.clamp(min=0)
        token = logp.gather(-1, safe[:, None]).squeeze(-1)
        p = logp.exp()
        entropy = -(p * logp).sum(-1) if "entropy" in outputs else None
        with torch.no_grad():
            lssp = torch.logsumexp(2 * logp, -1) if "log_sum_sq_probs" in outputs else None
            mean = logits.mean(-1) if "mean_logits" in outputs else None
            top1 = logits.argmax(-1) == safe if "is_top1" in outputs else None
        return token, entropy, lssp, mean, top1


def _child(args):
    sys.path.insert(0, str(ROOT / "examples"))
    import datasets
    import torch
    from _tiny import WORDS, model, tokenizer
    from trl import DPOConfig, DPOTrainer

    import fusedpref.integrations.trl as fp_trl
    from fusedpref import _library

    torch.set_num_threads(2)
    passes = []
    fused_loss = _library.fused_loss
    _library.fused_loss = lambda *a, **k: passes.append(1) or fused_loss(*a, **k)
    if args.kept_mb is not None:
        os.environ["FUSEDPREF_CHUNK_MB"] = str(args.kept_mb)
    if args.head in ("fusedpref", "recompute"):
        fp_trl.patch_trl()
    if args.head == "recompute":
        plain = fp_trl.preference_loss
        fp_trl.preference_loss = lambda *a, **k: plain(*a, grad_in_forward=False, **k)
    if args.head == "unfused":
        import trl.trainer.utils as utils
        utils._ChunkedLogProbFunction = UnfusedHead
    n = args.tokens // 2

    def text(seed, k):
        return " " + " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(k))

    data = datasets.Dataset.from_dict({"prompt": [text(i, 16) for i in range(args.pairs * args.steps)],
                                       "chosen": [text(i + 1, n) for i in range(args.pairs * args.steps)],
                                       "rejected": [text(i + 2, n) for i in range(args.pairs * args.steps)]})
    clock, times = fp_trl.step_clock()

    with tempfile.TemporaryDirectory() as out:
        cfg = DPOConfig(output_dir=out, max_steps=args.steps, report_to=[], logging_steps=1, save_strategy="no",
                        use_cpu=True, learning_rate=1e-3, optim="sgd", seed=0, bf16=args.bf16,
                        per_device_train_batch_size=args.pairs, max_length=args.tokens + 32, disable_tqdm=True)
        trainer = DPOTrainer(model=model(hidden=args.hidden, vocab=args.vocab),
                             ref_model=model(hidden=args.hidden, vocab=args.vocab), args=cfg, train_dataset=data,
                             processing_class=tokenizer(), callbacks=[clock])
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        trainer.train()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    print(json.dumps({"head": args.head, "rise_mb": peak - base, "step_s": statistics.median(times[1:] or times),
                      "first_loss": losses[0], "last_loss": losses[-1], "fused_passes": len(passes)}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--tokens", type=int, default=256, help="completion tokens per pair (chosen + rejected)")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per head (the first is not timed)")
    p.add_argument("--kept-mb", type=float, default=None,
                   help="FUSEDPREF_CHUNK_MB for fusedpref's runs (default: fusedpref's own, 8 MiB on the CPU)")
    p.add_argument("--bf16", action="store_true", help="TRL's bf16 autocast (its CPU default) instead of fp32")
    p.add_argument("--heads", default=",".join(HEADS), help="comma-separated subset of " + ", ".join(HEADS))
    p.add_argument("--head", choices=list(HEADS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.head:
        return _child(args)
    heads = args.heads.split(",")
    bad = [h for h in heads if h not in HEADS]
    if bad or args.steps < 1 or min(args.vocab, args.hidden, args.tokens, args.pairs) < 1:
        p.error(f"--heads must name some of {', '.join(HEADS)} (got {bad}); sizes and --steps must be >= 1")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TQDM_DISABLE": "1"}
    rows = []
    for head in heads:
        cmd = [sys.executable, __file__, "--head", head, "--vocab", str(args.vocab), "--hidden", str(args.hidden),
               "--tokens", str(args.tokens), "--pairs", str(args.pairs), "--steps", str(args.steps)]
        cmd += (["--bf16"] if args.bf16 else []) + ([] if args.kept_mb is None else ["--kept-mb", str(args.kept_mb)])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"the {head} run failed (exit {proc.returncode})")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"# DPOTrainer step (sigmoid, reference model), V={args.vocab}, hidden {args.hidden}, 2 layers, "
          f"{args.pairs} pairs x {args.tokens} completion tokens, {'bf16 autocast' if args.bf16 else 'fp32'}, CPU "
          f"(2 threads), {args.steps} steps per head, kept budget "
          f"{'default' if args.kept_mb is None else f'{args.kept_mb:g} MiB'}")
    print("| head | step time (s, median of steps 2+) | peak RSS rise (MB) | loss, first / last step | "
          "fused passes |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {HEADS[r['head']]} | {r['step_s']:.2f} | {r['rise_mb']:.0f} | {r['first_loss']:.6f} / "
              f"{r['last_loss']:.6f} | {r['fused_passes']} |")
    return rows


if __name__ == "__main__":
    main()
