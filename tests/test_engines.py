"""The engines users launch with (README "Distributed", "TRL drop-in"): TRL's DPOTrainer and
KTOTrainer after patch_trl() under `accelerate launch` with the DeepSpeed ZeRO-3 and FSDP2 configs
of examples/accelerate/ (2 processes, gloo, CPU), against one plain process with the same global
batch (or, where TRL's own statistics depend on the split, the same launch with TRL's heads):
every logged number, every final weight gathered in full, the head's weight partitioned at rest,
and the loss through fusedpref's preference_loss / kto_loss (its fused pass where it applies).
Gradient accumulation over micro-batches of different token counts on one process and on two."""
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import optional

optional("trl")
optional("accelerate")
optional("deepspeed")

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("gloo")]   # 2-process launches on fixed ports

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "accelerate" / "train.py"
UNTIMED = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")


# every configuration, per launch: (name, options); each engine is launched once and runs them in turn
PLANS = {
    "none": [("one-accum", "--batch 2 --grad-accum 2"), ("one-accum-trl", "--batch 2 --grad-accum 2 --unpatched"),
             ("one-expo", "--batch 4 --loss-type expo"), ("one-lora", "--batch 4 --peft"),
             ("one-kto-accum", "--trainer kto --batch 2 --grad-accum 2"),
             ("one-kto-accum-trl", "--trainer kto --batch 2 --grad-accum 2 --unpatched")],
    "zero3": [("zero3-accum", "--batch 1 --grad-accum 2"), ("zero3-expo", "--batch 2 --loss-type expo"),
              ("zero3-aot", "--batch 2 --loss-type aot"), ("zero3-aot-trl", "--batch 2 --loss-type aot --unpatched"),
              ("zero3-kto", "--trainer kto --batch 4"), ("zero3-kto-trl", "--trainer kto --batch 4 --unpatched"),
              ("zero3-lora", "--batch 2 --peft")],
    "fsdp2": [("fsdp2-accum", "--batch 1 --grad-accum 2"), ("fsdp2-expo", "--batch 2 --loss-type expo")],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (report, final weights)} of every planned run: one `accelerate launch` per engine
    with its config (2 processes), one plain process for the references."""
    sys.path.insert(0, str(ROOT / "examples"))
    from _tiny import model

    tmp = tmp_path_factory.mktemp("engines")
    model_dir = tmp / "model"
    model(seed=0).save_pretrained(model_dir)      # once: ZeRO-3 then loads it partitioned
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = {}
    for engine, plan in PLANS.items():
        cmd = [sys.executable, str(SCRIPT)] if engine == "none" else [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "examples" / "accelerate" / f"{engine}.yaml"), str(SCRIPT)]
        (first, opts), *rest = plan
        cmd += ["--engine", engine, "--model-dir", str(model_dir), "--out", str(tmp / f"{first}.json"),
                *shlex.split(opts)]
        for name, opts in rest:
            cmd += ["--then", f"{opts} --out {tmp / f'{name}.json'}"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, f"{engine}: {proc.stderr[-8000:]}"
        for name, _ in plan:
            path = tmp / f"{name}.json"
            out[name] = (json.loads(path.read_text()), torch.load(path.with_suffix(".pt")))
    return out


def same(a, b, *, rel=1e-4, abs_=1e-6, weights=1e-6):
    """Every logged number (rel, or abs near 0) and every final weight agree."""
    (ra, wa), (rb, wb) = a, b
    assert len(ra["rows"]) == len(rb["rows"]) > 0
    for x, y in zip(ra["rows"], rb["rows"]):
        assert x.keys() == y.keys()
        for key, want in x.items():
            if key in UNTIMED or not isinstance(want, (int, float)) or not math.isfinite(want):
                continue
            assert y[key] == pytest.approx(want, rel=rel, abs=abs_), key
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=weights, atol=weights, msg=name)


def partitioned(report):
    """Each of the 2 ranks held part of lm_head.weight at rest, together all of it."""
    parts = report["partition"]
    assert report["world"] == 2 and len(parts) == 2
    assert all(0 < p["lm_head_local"] < p["lm_head_full"] for p in parts), parts
    assert sum(p["lm_head_local"] for p in parts) == parts[0]["lm_head_full"], parts


def through_fusedpref(report, fused=True):
    assert report["patched"] and report["route"]["loss"] > 0, report["route"]
    assert (report["route"]["fused_passes"] > 0) == fused, report["route"]


@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_dpo_sigmoid_with_accumulation_equals_one_process(engine, runs):
    """2 ranks x 1 pair x 2 micro-batches = one process's 2 pairs x 2 micro-batches; the pairs'
    token counts differ from micro-batch to micro-batch."""
    two = runs[f"{engine}-accum"]
    same(runs["one-accum"], two)
    partitioned(two[0])
    through_fusedpref(two[0])


@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_expo_equals_one_process(engine, runs):
    """EXPO's exact KL under the engine: the reference head taken inside its own forward, the
    policy's loss inside the wrapped forward."""
    two = runs[f"{engine}-expo"]
    same(runs["one-expo"], two)
    partitioned(two[0])
    through_fusedpref(two[0])
    assert two[0]["rows"][-1]["kl/chosen"] > 0


def test_zero3_recompute_backward(runs):
    """aot couples the pairs: the recompute path, whose backward recomputes the logits (inside the
    engine's backward, where DeepSpeed's hooks on the loss have the head available). Against TRL's
    own heads in the same launch (aot sorts within each rank's batch)."""
    same(runs["zero3-aot-trl"], runs["zero3-aot"])
    through_fusedpref(runs["zero3-aot"][0], fused=False)
    assert not runs["zero3-aot-trl"][0]["patched"]


def test_zero3_head_called_outside_a_forward_gathers_itself(runs):
    """After training, the partitioned head through linear_logprobs outside any forward: gathered
    around the forward by the caller, and again by the backward recompute (the registered gather);
    dH equals the eager maths on the gathered weight."""
    for name in ("zero3-accum", "zero3-expo", "zero3-aot", "zero3-kto", "zero3-lora"):
        assert runs[name][0]["gather_check_err"] < 1e-5, name


def test_zero3_kto_equals_trls_heads(runs):
    """KTOTrainer's KL estimate z0 is a statistic of each rank's batch (its mismatched completions
    are formed within it), so the reference is the same launch with TRL's heads."""
    same(runs["zero3-kto-trl"], runs["zero3-kto"])
    partitioned(runs["zero3-kto"][0])
    through_fusedpref(runs["zero3-kto"][0])


def test_zero3_lora_equals_one_process(runs):
    """A LoRA policy whose reference is the base model with the adapters disabled, partitioned."""
    same(runs["one-lora"], runs["zero3-lora"])
    through_fusedpref(runs["zero3-lora"][0], fused=False)     # a frozen head: its one-pass path


@pytest.mark.parametrize("trainer", ["", "kto-"])
def test_accumulation_on_one_process_equals_trls_heads(trainer, runs):
    same(runs[f"one-{trainer}accum-trl"], runs[f"one-{trainer}accum"])
    through_fusedpref(runs[f"one-{trainer}accum"][0])
