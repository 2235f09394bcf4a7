"""Forward+backward time of preference_loss on the recompute path and on the gradients-in-forward
path with a few kept budgets, side by side in one run (torch backend; CUDA tensors and the Triton
backend when a GPU is present).

    python bench/grad_in_forward.py [--pairs 4 --seq 256 --d 128 --v 32000 --repeats 5 --kept 64 132]
"""
import argparse
import statistics
import time

import torch

import fusedpref


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kept", type=float, nargs="*", default=[64, 132], help="kept budgets in MiB")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    h0 = torch.randn(2 * a.pairs, a.seq, a.d, device=dev).to(dtype)
    w0 = (torch.randn(a.v, a.d, device=dev) / a.d ** 0.5).to(dtype)
    y = torch.randint(0, a.v, (2 * a.pairs, a.seq), device=dev)
    y[:, : a.seq // 2] = -100
    ref = -torch.rand(2 * a.pairs, device=dev) * a.seq * 2

    def step(gif, kept):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = fusedpref.preference_loss(h, w, y, ref_logps=ref, grad_in_forward=gif, kept_mb=kept)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    cases = [("recompute path", False, None)] + [(f"kept path, {k:g} MiB", True, k) for k in a.kept]
    times = {name: [] for name, _, _ in cases}
    for rep in range(a.repeats + 1):        # interleaved; the first round is a warm-up
        for name, gif, kept in cases:
            t = step(gif, kept)
            if rep:
                times[name].append(t)
    print(f"# {dev} {dtype}: {a.pairs} pairs x {a.seq} tokens (half prompt), D={a.d}, V={a.v}; median of "
          f"{a.repeats}")
    base = statistics.median(times["recompute path"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:24s} {m * 1e3:8.1f} ms  {m / base:5.2f}x")


if __name__ == "__main__":
    main()
