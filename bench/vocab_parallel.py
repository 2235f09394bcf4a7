"""Vocabulary-parallel preference_loss beside the single-process one: W gloo ranks on 127.0.0.1,
each holding V / W rows of the policy and reference heads (and the same hidden states and
targets), time one fused forward + backward step, count the bytes each rank sends (every
torch.distributed collective wrapped) and the rise of each rank's peak RSS over the step. W = 1 is
the plain call, in its own process too. The cores are split between the ranks
(torch.set_num_threads), so on a small CPU the time compares equal total compute.

    python bench/vocab_parallel.py [--world 1 2] [--tokens 2048] [--hidden 256] [--vocab 32000]
                                   [--loss expo] [--backend torch] [--steps 3] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast",
               "reduce_scatter_tensor", "all_to_all_single")


def _count_bytes(log):
    """Wraps every torch.distributed collective of COLLECTIVES to add its payload to log[0]."""
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def wrapped(*args, _fn=fn, _name=name, **kwargs):
            sent = args[1] if _name in ("all_gather_single", "all_gather_into_tensor") else args[0]
            if isinstance(sent, torch.Tensor):
                log[0] += sent.numel() * sent.element_size()
            return _fn(*args, **kwargs)
        setattr(dist, name, wrapped)


def _problem(a):
    g = torch.Generator().manual_seed(0)
    t = a.tokens // (2 * a.pairs)
    h = torch.randn(2 * a.pairs, t, a.hidden, generator=g)
    w = torch.randn(a.vocab, a.hidden, generator=g) / a.hidden ** 0.5
    rw = w + 0.1 * torch.randn(a.vocab, a.hidden, generator=g) / a.hidden ** 0.5
    rh = h + 0.1 * torch.randn(h.shape, generator=g)
    y = torch.randint(0, a.vocab, h.shape[:-1], generator=g)
    y[:, : t // 4] = -100                                   # a prompt
    return h, w, rh, rw, y


def _rank(rank, world, port, a, results):
    import fusedpref

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    group = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        group = dist.group.WORLD
    h, w, rh, rw, y = _problem(a)
    lo = rank * a.vocab // world
    hi = (rank + 1) * a.vocab // world
    w, rw = w[lo:hi].clone(), rw[lo:hi].clone()            # this rank holds only its shards
    sent = [0]
    _count_bytes(sent)
    times, losses = [], []
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for step in range(a.steps + 1):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        if group is not None:
            dist.barrier()
        sent[0] = 0
        t0 = time.perf_counter()
        loss, _ = fusedpref.preference_loss(hh, ww, y, ref_hidden=rh, ref_weight=rw, loss_type=a.loss, beta=0.1,
                                            backend=a.backend, process_group=group)
        loss.backward()
        if group is not None:
            dist.barrier()
        if step:                                           # the first step warms up
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results.put((rank, statistics.median(times), sent[0], peak - base, losses[-1], hi - lo))
    if group is not None:
        dist.destroy_process_group()


def run(world, a):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    procs = mp.start_processes(_rank, args=(world, port, a, results), nprocs=world, start_method="spawn",
                               join=False)
    procs.join()
    rows = sorted(results.get() for _ in range(world))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--loss", default="expo")
    p.add_argument("--backend", default="torch")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    nv = int((_problem(a)[-1] != -100).sum())
    lines = [f"# fusedpref vocab-parallel preference_loss ({a.loss}), {a.backend} backend, N={a.tokens} tokens "
             f"({nv} valid), D={a.hidden}, V={a.vocab}, fp32, gloo on 127.0.0.1, {os.cpu_count()} cores split "
             f"between the ranks; {time.strftime('%Y-%m-%d')}",
             "# world  rank  V_r     step_ms  sent_bytes  bytes/valid_token  rss_rise_MB  loss"]
    for world in a.world:
        for rank, t, sent, rss, loss, v_r in run(world, a):
            lines.append(f"{world:7d}  {rank:4d}  {v_r:6d}  {t * 1e3:7.1f}  {sent:10d}  {sent / nv:17.1f}  "
                         f"{rss:11.1f}  {loss:.6f}")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
