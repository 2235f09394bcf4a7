"""Peak memory of one TRL DPOTrainer step, fusedpref's head (patch_trl) beside TRL's own, on the
CPU at a shape where the LM head dominates (a 2-layer Llama of hidden 256 with a 65536-token
vocabulary, 4 pairs of 256 tokens). Each run is its own process; the figure is the rise of the
peak RSS over one optimizer step (plain SGD, so no optimizer state), with
MALLOC_MMAP_THRESHOLD_ set so that freed blocks return to the OS.

    python bench/trl_memory.py [--vocab 65536] [--hidden 256] [--tokens 256] [--pairs 4] [--bf16]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _child(args):
    sys.path.insert(0, str(ROOT / "examples"))
    import datasets
    import torch
    from _tiny import WORDS, model, tokenizer
    from trl import DPOConfig, DPOTrainer

    import fusedpref.integrations.trl as fp_trl

    torch.set_num_threads(2)
    if args.mode == "fusedpref":
        fp_trl.patch_trl()
    n = args.tokens // 2

    def text(seed, k):
        return " " + " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(k))

    data = datasets.Dataset.from_dict({"prompt": [text(i, 16) for i in range(args.pairs)],
                                       "chosen": [text(i + 1, n) for i in range(args.pairs)],
                                       "rejected": [text(i + 2, n) for i in range(args.pairs)]})
    with tempfile.TemporaryDirectory() as out:
        cfg = DPOConfig(output_dir=out, max_steps=1, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
                        learning_rate=1e-3, optim="sgd", seed=0, bf16=args.bf16, per_device_train_batch_size=args.pairs,
                        max_length=args.tokens + 32, disable_tqdm=True)
        trainer = DPOTrainer(model=model(hidden=args.hidden, vocab=args.vocab), ref_model=model(hidden=args.hidden,
                                                                                                vocab=args.vocab),
                             args=cfg, train_dataset=data, processing_class=tokenizer())
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        trainer.train()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    loss = [r for r in trainer.state.log_history if "loss" in r][0]["loss"]
    print(json.dumps({"mode": args.mode, "rise_mb": peak - base, "loss": loss}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--tokens", type=int, default=256, help="completion tokens per pair (chosen + rejected)")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--bf16", action="store_true", help="TRL's bf16 autocast (its CPU default) instead of fp32")
    p.add_argument("--mode", choices=["trl", "fusedpref"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mode:
        return _child(args)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TQDM_DISABLE": "1"}
    rows = []
    for mode in ("trl", "fusedpref"):
        cmd = [sys.executable, __file__, "--mode", mode, "--vocab", str(args.vocab), "--hidden", str(args.hidden),
               "--tokens", str(args.tokens), "--pairs", str(args.pairs)] + (["--bf16"] if args.bf16 else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows_n = 2 * args.pairs * args.tokens // 2
    print(f"# DPOTrainer step, V={args.vocab}, hidden {args.hidden}, {args.pairs} pairs x {args.tokens} completion "
          f"tokens (~{rows_n} head rows), {'bf16 autocast' if args.bf16 else 'fp32'}, CPU")
    print("| head | peak RSS rise over the step (MB) | loss |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {'TRL ChunkedLogProbFunction' if r['mode'] == 'trl' else 'fusedpref (patch_trl)'} | "
              f"{r['rise_mb']:.0f} | {r['loss']:.6f} |")
    print(f"# TRL / fusedpref: {rows[0]['rise_mb'] / max(rows[1]['rise_mb'], 1e-9):.2f}x")
    return rows


if __name__ == "__main__":
    main()
