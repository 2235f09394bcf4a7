"""TRL's DPOTrainer or KTOTrainer with fusedpref's heads, as users launch it: under `accelerate
launch` with a DeepSpeed ZeRO-3 or an FSDP2 config, or as one plain process (the reference run).
Offline and on the CPU: a tiny random Llama saved to --model-dir first (so that ZeRO-3 loads it
partitioned), the examples' word-level tokenizer and datasets.

    accelerate launch --config_file examples/accelerate/zero3.yaml examples/accelerate/train.py \\
        --engine zero3 --loss-type expo --out /tmp/zero3.json
    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/accelerate/train.py \\
        --engine fsdp2 --out /tmp/fsdp2.json
    python examples/accelerate/train.py --engine none --batch 4 --out /tmp/one.json   # the same global batch

--batch is per process: 2 processes with --batch 2 see the global batch of one with --batch 4.
--then "OPTIONS" runs another configuration in the same processes afterwards (the tests launch
each engine once).
Writes --out: the logged rows, what each rank held of lm_head.weight at rest, and (beside it, .pt)
the final weights gathered in full.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _cpu_engine_setup(engine):
    """What DeepSpeed and accelerate need on a machine without GPUs (GUIDE, section 6); nothing on
    a machine with them."""
    import torch

    if torch.cuda.is_available():
        return
    if engine == "zero3":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")          # its CPU accelerator: gloo without oneCCL
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"         # else accelerate sets world size 1 on CPUs
        import deepspeed.comm.torch as ds_torch

        ds_torch.build_shm_op = lambda: None                    # a g++ JIT build (70-150 s) training never uses
    if engine != "none":
        import accelerate

        # before the trainer's config is made (which then uses it: accelerator_config's
        # use_configured_state); FSDP on CPUs needs the MULTI_CPU state (cpu=True), ZeRO-3 its own
        accelerate.PartialState(cpu=engine == "fsdp2", backend="gloo")
    if engine == "fsdp2":
        # accelerate turns FSDP on only for accelerator device types (AcceleratorState: MULTI_GPU, ...,
        # not MULTI_CPU); torch's fully_shard itself runs on CPU tensors over gloo
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType

        init = AcceleratorState.__init__

        def cpu_fsdp_init(self, *args, fsdp_plugin=None, **kwargs):
            init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
            if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
                self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
        AcceleratorState.__init__ = cpu_fsdp_init


def _partition(model, engine):
    """What this rank holds of lm_head.weight at rest: (local elements, full elements)."""
    w = model.get_output_embeddings().weight
    if engine == "zero3":
        return int(w.ds_tensor.numel()), int(w.ds_numel)
    if engine == "fsdp2":
        local = w.to_local() if hasattr(w, "to_local") else w
        return int(local.numel()), int(w.numel())
    return int(w.numel()), int(w.numel())


def _gather_check(trainer):
    """fusedpref's head called outside any forward under ZeRO-3, where it must gather the
    partitioned head itself: the caller's gather around the forward (functions.gathered), the
    backward recompute's through the registered gather (patch_trl: TRL's maybe_gather_lm_head_ctx).
    Returns max |dH - dH of the same maths on the gathered weight| (eager)."""
    import torch

    import fusedpref
    from fusedpref import functions

    weight = trainer.accelerator.unwrap_model(trainer.model_wrapped).get_output_embeddings().weight
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, weight.ds_shape[1], generator=g, requires_grad=True)
    y = torch.randint(0, weight.ds_shape[0], (6,), generator=g)
    with functions.gathered(weight):
        full = weight.detach().clone()
        logp = fusedpref.linear_logprobs(h, weight, y, backend="torch")
    assert weight.numel() == 0, "the head is partitioned again before the backward"
    dh, = torch.autograd.grad(logp.sum(), h)          # the recompute reads the weight again
    h2 = h.detach().requires_grad_()
    eager, = torch.autograd.grad(torch.log_softmax(h2 @ full.t(), -1).gather(1, y[:, None]).sum(), h2)
    return (dh - eager).abs().max().item()


def _full_weights(trainer, engine):
    """Every trainable weight in full (on every rank), as CPU tensors."""
    model = trainer.model_wrapped if engine == "zero3" else trainer.model
    params = dict(trainer.accelerator.unwrap_model(model).named_parameters())
    if engine == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {n: p.detach().clone().cpu() for n, p in params.items()}
    out = {}
    for n, p in params.items():
        t = p.detach()
        out[n] = (t.full_tensor() if hasattr(t, "full_tensor") else t).clone().cpu()
    return out


def _parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["none", "zero3", "fsdp2"], required=True,
                   help="what the launch config runs (none: one plain process)")
    p.add_argument("--trainer", choices=["dpo", "kto"], default="dpo")
    p.add_argument("--loss-type", default="sigmoid", help="DPOConfig.loss_type (sigmoid, expo, ...)")
    p.add_argument("--batch", type=int, default=2, help="per-process batch (pairs for DPO, sequences for KTO)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--unpatched", action="store_true", help="TRL's own heads (no patch_trl)")
    p.add_argument("--peft", action="store_true", help="a LoRA policy whose reference is the base model")
    p.add_argument("--model-dir", default=None, help="a saved tiny Llama (default: made beside --out)")
    p.add_argument("--out", required=True)
    p.add_argument("--then", action="append", default=[], metavar="ARGS",
                   help="another run in the same processes after this one (its own options as one string, "
                        "e.g. \"--loss-type expo --out /tmp/b.json\"; --engine and --model-dir carry over)")
    return p


def main(argv=None):
    p = _parser()
    a = p.parse_args(argv)
    _cpu_engine_setup(a.engine)
    runs = [a] + [p.parse_args(["--engine", a.engine, *(["--model-dir", a.model_dir] if a.model_dir else []),
                                *shlex.split(extra)]) for extra in a.then]
    for r in runs:
        _run(r)
    return 0


def _run(a):
    """One training run; writes a.out (rank 0)."""
    import torch
    from _tiny import model as tiny_model
    from _tiny import preference_data, tokenizer, unpaired_data
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    import fusedpref.integrations.trl as fp_trl
    from fusedpref import _library

    route = {"loss": 0, "fused_passes": 0}      # what ran: fusedpref's losses and its fused passes
    originals = [(obj, name, getattr(obj, name)) for obj, name in
                 ((fp_trl, "preference_loss"), (fp_trl, "kto_loss"), (_library, "fused_loss"))]
    for obj, name, fn in originals:
        def counted(*args, _fn=fn, _key="fused_passes" if name == "fused_loss" else "loss", **kw):
            route[_key] += 1
            return _fn(*args, **kw)
        setattr(obj, name, counted)

    model_dir = Path(a.model_dir or Path(a.out).with_suffix(".model"))
    rank = int(os.environ.get("RANK", "0"))
    if not (model_dir / "config.json").exists():
        if rank == 0:
            tiny_model(seed=0).save_pretrained(model_dir)
        if a.engine != "none":
            torch.distributed.barrier()
    if not a.unpatched:
        fp_trl.patch_trl()
    common = dict(output_dir=str(Path(a.out).with_suffix(".run")), max_steps=a.steps, report_to=[], logging_steps=1,
                  save_strategy="no", learning_rate=0.1, optim="sgd", seed=0, bf16=False,
                  per_device_train_batch_size=a.batch, gradient_accumulation_steps=a.grad_accum, disable_tqdm=True,
                  dataloader_drop_last=True)
    if a.engine == "none":
        common["use_cpu"] = True
    else:
        common.update(use_cpu=False, accelerator_config={"use_configured_state": True})
    peft_config = None
    if a.peft:
        import peft

        peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    # the config first: under ZeRO-3 it makes from_pretrained load the models partitioned (zero.Init)
    config = DPOConfig(**common, loss_type=a.loss_type, beta=0.5) if a.trainer == "dpo" else \
        KTOConfig(**common, beta=0.5)
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    ref = None if a.peft else AutoModelForCausalLM.from_pretrained(model_dir)
    if a.trainer == "dpo":
        trainer = DPOTrainer(model=policy, ref_model=ref, args=config, train_dataset=preference_data(),
                             processing_class=tokenizer(), peft_config=peft_config)
    else:
        trainer = KTOTrainer(model=policy, ref_model=ref, args=config, train_dataset=unpaired_data(),
                             processing_class=tokenizer())
    trainer.train()
    local, full = _partition(trainer.accelerator.unwrap_model(trainer.model), a.engine)   # at rest, after training
    rows = [r for r in trainer.state.log_history if "loss" in r]
    gather_err = _gather_check(trainer) if a.engine == "zero3" and not a.unpatched else None
    weights = _full_weights(trainer, a.engine)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    parts = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(parts, {"rank": rank, "lm_head_local": local, "lm_head_full": full})
    else:
        parts = [{"rank": 0, "lm_head_local": local, "lm_head_full": full}]
    if rank == 0:
        torch.save(weights, Path(a.out).with_suffix(".pt"))
        Path(a.out).write_text(json.dumps({"engine": a.engine, "world": world, "rows": rows, "partition": parts,
                                           "patched": not a.unpatched, "route": route,
                                           "gather_check_err": gather_err}, indent=1))
    fp_trl.unpatch_trl()
    for obj, name, fn in originals:
        setattr(obj, name, fn)
    if a.engine != "none":      # the next run's Accelerator takes its own plugins (the process group stays)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()


if __name__ == "__main__":
    sys.exit(main())
