"""Gradient filtering (preference_loss(grad_filter=...)) on a peaked head: matmul FLOPs and the
gradients' error against the float64 exact gradients, on both paths (gradients in forward and
the recompute path), torch backend, CPU.

The head is trained first (Adam on the cross-entropy of the batch's targets, a few dozen steps)
so that its softmax is peaked as a trained LM head's is: most (row block x vocabulary tile) blocks
of dz then hold only tiny probabilities, which is what filtering skips.

    python bench/grad_filter.py [--pairs 4] [--tokens 64] [--hidden 64] [--vocab 32768] [--steps 4]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def peaked_head(pairs=4, tokens=64, hidden=64, vocab=32768, steps=4, seed=0):
    """(h [2B, T, D], W [V, D], targets [2B, T] with a prompt half ignored, ref_logps [2B]), W
    trained `steps` Adam steps on the targets' cross-entropy (fp32)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * pairs, tokens, hidden, generator=g)
    w = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).requires_grad_()
    y = torch.randint(0, vocab, (2 * pairs, tokens), generator=g)
    y[:, : tokens // 2] = -100
    opt = torch.optim.Adam([w], lr=0.05)
    valid = y != -100
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy((h[valid] @ w.t()), y[valid]).backward()
        opt.step()
    ref = torch.randn(2 * pairs, generator=g) * 2 - 10.0 * valid.sum(-1)
    return h, w.detach(), y, ref


def target_prob(h, w, y):
    """The mean probability of the target token: how peaked the head is."""
    valid = y != -100
    return torch.softmax(h[valid] @ w.t(), -1).gather(1, y[valid][:, None]).mean().item()


def measure(h, w, y, ref, grad_filter, path, dtype=torch.float32):
    """(matmul FLOPs per valid token in D*V units, max |dH - dH64| / max |dH64|, the same for dW)."""
    import fusedpref
    from helpers import matmul_flops

    def grads(filt, gif, dt):
        hh, ww = h.to(dt).requires_grad_(), w.to(dt).requires_grad_()     # (bf16: the operands only)
        out = {}

        def step():
            loss, _ = fusedpref.preference_loss(hh, ww, y, ref_logps=ref, beta=0.5, backend="torch",
                                                grad_in_forward=gif, grad_filter=filt, kept_mb=256)
            out["g"] = torch.autograd.grad(loss, (hh, ww))
        return matmul_flops(step), out["g"]

    _, (dh64, dw64) = grads(None, False, torch.float64)
    flops, (dh, dw) = grads(grad_filter, path == "in forward", dtype)
    n_valid, d, v = int((y != -100).sum()), w.shape[1], w.shape[0]
    rel = lambda a, b: ((a.double() - b).abs().max() / b.abs().max()).item()  # noqa: E731
    return flops / (n_valid * d * v), rel(dh, dh64), rel(dw, dw64)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--steps", type=int, default=4, help="Adam steps that peak the head")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    h, w, y, ref = peaked_head(args.pairs, args.tokens, args.hidden, args.vocab, args.steps)
    print(f"# sigmoid DPO, precomputed reference, {args.pairs} pairs x {args.tokens} tokens (half prompt), "
          f"D={args.hidden}, V={args.vocab}, head peaked by {args.steps} Adam steps (mean target prob "
          f"{target_prob(h, w, y):.3f}); torch backend; errors: max |error| / max |float64 exact|")
    print("| operands | grad_filter | path | matmul FLOPs / valid token (D·V) | dH rel err | dW rel err |")
    print("|---|---|---|---|---|---|")
    rows = []
    cases = [(torch.float32, f) for f in (None, "auto", 1e-7, 1e-6, 1e-5)] + \
        [(torch.bfloat16, f) for f in (None, "auto")]
    for dtype, filt in cases:
        for path in ("in forward", "recompute"):
            f, eh, ew = measure(h, w, y, ref, filt, path, dtype)
            rows.append((dtype, filt, path, f, eh, ew))
            eps = torch.finfo(dtype).eps / 32
            label = "None (exact)" if filt is None else f"auto ({eps:.2g})" if filt == "auto" else f"{filt:g}"
            print(f"| {str(dtype).replace('torch.', '')} | {label} | {path} | {f:.3f} | {eh:.2e} | {ew:.2e} |")
    return rows


if __name__ == "__main__":
    main()
