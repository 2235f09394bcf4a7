"""FSDP2 weights in the TRL heads: a DTensor head (sharded over 2 gloo processes on 127.0.0.1)
gives the same outputs and gradients as the full tensor, in FusedLogProbHead, FusedDivergence
and TRL's add_fused_lm_head forward of a tiny model sharded with fully_shard; DPOTrainer on an
FSDP2 model, each rank its own pairs, trains as the unsharded model on all of them."""
import pytest
import torch
import torch.distributed as dist
from dist_helpers import run_ranks
from helpers import optional

# gloo ranks in subprocesses; one xdist worker runs every gloo test (scripts/test.sh: --dist loadgroup), so that
# no two pick the same free port at once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("gloo")]

optional("trl")

WORLD = 2


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


def _dpo_trainer_fsdp2(rank):
    """DPOTrainer (fusedpref's heads, sigmoid and EXPO) on a tiny Llama under fully_shard, each rank
    its own 4 of the 8 pairs, 3 SGD steps: the ranks' mean logged loss equals the unsharded model's
    on all 8 pairs (FSDP2 averages the gradients)."""
    import tempfile

    import trl_trainers as T
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh
    from trl import DPOConfig, DPOTrainer

    import fusedpref.integrations.trl as fp_trl

    mesh = init_device_mesh("cpu", (WORLD,))
    data = T.preference_data()
    calls = []
    original = fp_trl.FusedLogProbHead.apply
    fp_trl.FusedLogProbHead.apply = staticmethod(lambda *a, **k: calls.append(1) or original(*a, **k))
    try:
        for loss_type in ("sigmoid", "expo"):
            losses = {}
            for kind in ("plain", "fsdp2"):
                model = T.model()
                ds = data
                if kind == "fsdp2":
                    for layer in model.model.layers:
                        fully_shard(layer, mesh=mesh)
                    fully_shard(model, mesh=mesh)
                    ds = data.select(range(4 * rank, 4 * rank + 4))
                cfg = DPOConfig(output_dir=tempfile.mkdtemp(), max_steps=3, report_to=[], logging_steps=1,
                                save_strategy="no", use_cpu=True, learning_rate=0.1, optim="sgd", seed=0, bf16=False,
                                per_device_train_batch_size=len(ds), loss_type=loss_type)
                n_calls = len(calls)
                with T.patched(True):
                    trainer = DPOTrainer(model=model, ref_model=T.model(), args=cfg, train_dataset=ds,
                                         processing_class=T.tokenizer())
                    trainer.train()
                assert len(calls) > n_calls, "fusedpref's head did not run"
                got = torch.tensor([row["loss"] for row in trainer.state.log_history if "loss" in row])
                if kind == "fsdp2":
                    dist.all_reduce(got)
                    got /= WORLD
                losses[kind] = got
            assert losses["plain"].numel() == 3
            torch.testing.assert_close(losses["fsdp2"], losses["plain"], rtol=1e-5, atol=1e-6,
                                       msg=f"{loss_type} rank {rank}")
    finally:
        fp_trl.FusedLogProbHead.apply = original


CHECKS = {"heads": _heads, "fsdp": _fsdp_model, "dpo_fsdp2": _dpo_trainer_fsdp2}


def _ranks(rank, world, which):
    CHECKS[which](rank)


@pytest.mark.parametrize("which", list(CHECKS))
def test_dtensor_heads_over_two_gloo_processes(which):
    run_ranks(_ranks, WORLD, which)
