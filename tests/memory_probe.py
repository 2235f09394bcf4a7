"""Run in a subprocess by test_memory.py: peak-RSS increase of one forward+backward.

usage: python memory_probe.py {eager|fused}[_kl|_logprobs_kl] N D V
Prints JSON {"raise_mb": ...}. MALLOC_MMAP_THRESHOLD_ must be set by the caller so that freed
large blocks go back to the OS and the peak tracks live memory.
"""
import json
import resource
import sys

import torch

import fusedpref
from fusedpref.reference import eager_kl, eager_logprobs


def rss_peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    mode, n, d, v = sys.argv[1], *map(int, sys.argv[2:5])
    torch.manual_seed(0)
    torch.set_num_threads(2)
    h = torch.randn(n, d, requires_grad=True)
    w = (torch.randn(v, d) * 0.05).requires_grad_()
    y = torch.randint(0, v, (n,))
    g = torch.randn(n)
    # warm up allocator/threads on a tiny problem so the baseline includes library overheads
    small = fusedpref.linear_logprobs(h[:4], w[:64], y[:4] % 64, backend="torch")
    small.sum().backward()
    h.grad = w.grad = None
    rh, rw = torch.randn(n, d), torch.randn(v, d) * 0.05
    base = rss_peak_mb()
    if mode == "eager":
        out = eager_logprobs(h, w, y)
    elif mode == "fused":
        out = fusedpref.linear_logprobs(h, w, y, backend="torch")
    elif mode == "eager_kl":
        out = eager_kl(h, w, rh, rw, y)
    elif mode == "fused_kl":
        out = fusedpref.linear_kl(h, w, rh, rw, y, backend="torch")
    elif mode == "eager_logprobs_kl":   # EXPO's per-token work, eagerly
        out = eager_logprobs(h, w, y) + eager_kl(h, w, rh, rw, y) + eager_logprobs(rh, rw, y).detach()
    elif mode == "fused_logprobs_kl":
        logp, ref_logp, kl = fusedpref.linear_logprobs_kl(h, w, rh, rw, y, backend="torch")
        out = logp + kl + ref_logp
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    out.backward(g)
    print(json.dumps({"raise_mb": rss_peak_mb() - base, "base_mb": base,
                      "grad_mb": (h.grad.numel() + w.grad.numel()) * 4 / 2**20}))


if __name__ == "__main__":
    main()
