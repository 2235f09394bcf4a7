"""FSDP2 weights in the TRL heads: a DTensor head (sharded over 2 gloo processes on 127.0.0.1)
gives the same outputs and gradients as the full tensor, in FusedLogProbHead, FusedDivergence
and TRL's add_fused_lm_head forward of a tiny model sharded with fully_shard."""
import gc
import os
import socket
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import optional

optional("trl")

WORLD = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem(seed=0, n=13, d=16, v=96, d_t=24):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) / 2, torch.randn(v, generator=g) * 0.1,
            torch.randint(0, v, (n,), generator=g), torch.randn(n, d_t, generator=g),
            torch.randn(v, d_t, generator=g) / 2)


def _heads(rank):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    import fusedpref.integrations.trl as fp_trl

    mesh = init_device_mesh("cpu", (WORLD,))
    h0, w0, b0, y, ht, wt = _problem()
    g = torch.randn(h0.shape[0], generator=torch.Generator().manual_seed(1))
    results = {}
    for kind in ("full", "dtensor"):
        h = h0.clone().requires_grad_()
        if kind == "full":
            w = w0.clone().requires_grad_()
            teacher = wt
        else:
            w = distribute_tensor(w0.clone(), mesh, [Shard(0)]).requires_grad_()
            teacher = distribute_tensor(wt.clone(), mesh, [Shard(0)])
        logp, ent, *_ = fp_trl.FusedLogProbHead.apply(h, w, b0, y, 0.8, 64, 5.0, 1.1, ("log_probs", "entropy"))
        div, _ = fp_trl.FusedDivergence.apply(h, w, None, ht, teacher, None, 0.5, 1.0)
        dh, dw = torch.autograd.grad((logp * g).sum() + ent.sum() + div.sum(), (h, w))
        dw = dw.full_tensor() if hasattr(dw, "full_tensor") else dw
        results[kind] = [logp.detach(), ent.detach(), div.detach(), dh, dw]
    for name, a, b in zip(("logp", "entropy", "divergence", "dH", "dW"), results["dtensor"], results["full"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")


def _fsdp_model(rank):
    import transformers
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, init_device_mesh
    from trl.trainer.utils import add_fused_lm_head

    import fusedpref.integrations.trl as fp_trl

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :3] = -100
    outs = {}
    for kind in ("plain", "fsdp2"):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
        add_fused_lm_head(model, outputs=("log_probs", "entropy"))
        if kind == "fsdp2":
            fully_shard(model, mesh=mesh)
            assert isinstance(model.lm_head.weight, DTensor)
        fp_trl.patch_trl()
        try:
            out = model(input_ids=ids, labels=labels, fused_lm_head=True)
            out.loss.backward()
        finally:
            fp_trl.unpatch_trl()
        grad = model.lm_head.weight.grad
        outs[kind] = [out.log_probs.detach(), out.entropy.detach(),
                      grad.full_tensor() if isinstance(grad, DTensor) else grad]
        del model, out
    for name, a, b in zip(("log_probs", "entropy", "lm_head grad"), outs["fsdp2"], outs["plain"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")


def _worker(rank, port, which, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        {"heads": _heads, "fsdp": _fsdp_model}[which](rank)
        errors.put(f"ok {rank}")
    except BaseException:  # noqa: BLE001 - reported to the parent
        errors.put(traceback.format_exc())
    finally:
        if dist.is_initialized():
            # every rank's collectives done (FSDP2's hooks included) before the group goes away
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


@pytest.mark.parametrize("which", ["heads", "fsdp"])
def test_dtensor_heads_over_two_gloo_processes(which):
    ctx = mp.get_context("spawn")
    reports = ctx.SimpleQueue()
    procs = mp.start_processes(_worker, args=(_free_port(), which, reports), nprocs=WORLD, start_method="spawn",
                               join=False)
    for p in procs.processes:
        p.join(timeout=300)
    for p in procs.processes:
        if p.is_alive():        # a hang: stop it, and the missing report fails the test
            p.terminate()
    got = []
    while not reports.empty():
        got.append(reports.get())
    failures = [r for r in got if not r.startswith("ok ")]
    assert not failures, "\n".join(failures)
    assert sorted(got) == [f"ok {r}" for r in range(WORLD)], got      # every rank checked its results
    crashed = [(i, p.exitcode) for i, p in enumerate(procs.processes) if p.exitcode != 0]
    if crashed:   # after reporting: a crash in torch.distributed's teardown, not in what is tested
        warnings.warn(f"ranks {crashed} exited abnormally after their checks passed (teardown)")
