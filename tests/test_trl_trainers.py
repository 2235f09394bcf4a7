"""TRL's own trainers after fusedpref.integrations.trl.patch_trl(), on the CPU (tiny random-weight
Llama models from a config, an offline word-level tokenizer, fp32): two optimizer steps patched
vs unpatched from identical weights give the same logged metrics (rel 1e-5) and the same
weights, fusedpref's heads ran, and TRL's own head functions were never called."""
import math

import pytest
import torch
from helpers import matmul_flops, optional

optional("trl")
optional("datasets")
import trl_trainers as T  # noqa: E402
from trl import (DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, KTOConfig, KTOTrainer, RLOOConfig,  # noqa: E402
                 RLOOTrainer, SFTConfig, SFTTrainer)
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction  # noqa: E402
from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: E402
from trl.trainer.distillation_config import DistillationConfig  # noqa: E402
from trl.trainer.distillation_trainer import DistillationTrainer  # noqa: E402

import fusedpref.integrations.trl as fp_trl  # noqa: E402
from fusedpref import _library  # noqa: E402

pytestmark = pytest.mark.slow   # TRL trainers

# wall-clock and throughput entries differ run to run
UNTIMED = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")


@pytest.fixture
def args(tmp_path):
    def make(cls, **kw):
        # plain SGD: Adam's first steps divide by |g| and turn rounding differences of ~0 gradients
        # into whole learning-rate steps, which says nothing about the heads
        common = dict(output_dir=str(tmp_path / "out"), max_steps=2, report_to=[], logging_steps=1,
                      save_strategy="no", use_cpu=True, learning_rate=0.1, optim="sgd", seed=0, bf16=False)
        return cls(**{**common, **kw})
    return make


def _never(name):
    def fail(*a, **k):
        raise AssertionError(f"TRL's own {name} was called after patch_trl()")
    return staticmethod(fail)


def compare(make_trainer, monkeypatch, *, head="logprob", loss=None, fused=None):
    """Trains twice from identical weights, TRL's heads and fusedpref's; compares every logged
    number and every trainable weight; returns the patched run's logs. loss: the fusedpref loss
    the trainer's loss must go through ("preference_loss", "kto_loss"; None: neither), fused
    whether its gradients-in-forward pass must run (None: not checked)."""
    ref_logs, ref_w, _ = T.train(make_trainer, False)
    calls = {"logprob": 0, "divergence": 0, "preference_loss": 0, "kto_loss": 0, "fused": 0}
    for cls, key in ((fp_trl.FusedLogProbHead, "logprob"), (fp_trl.FusedDivergence, "divergence")):
        original = cls.apply

        def counted(*a, _original=original, _key=key, **k):
            calls[_key] += 1
            return _original(*a, **k)
        monkeypatch.setattr(cls, "apply", staticmethod(counted))
    for obj, name in ((fp_trl, "preference_loss"), (fp_trl, "kto_loss"), (_library, "fused_loss")):
        def counted_fn(*a, _original=getattr(obj, name), _key="fused" if name == "fused_loss" else name, **k):
            calls[_key] += 1
            return _original(*a, **k)
        monkeypatch.setattr(obj, name, counted_fn)
    with monkeypatch.context() as m:
        m.setattr(ChunkedLogProbFunction, "apply", _never("ChunkedLogProbFunction"))
        m.setattr(ChunkedDivergenceFunction, "apply", _never("ChunkedDivergenceFunction"))
        logs, w, _ = T.train(make_trainer, True)
    assert calls[head] > 0, f"fusedpref's {head} head did not run"
    for name in ("preference_loss", "kto_loss"):
        assert (calls[name] > 0) == (loss == name), (name, calls)
    if fused is not None:
        assert (calls["fused"] > 0) == fused, calls
    assert len(logs) == len(ref_logs) == 2
    for row, ref_row in zip(logs, ref_logs):
        assert row.keys() == ref_row.keys()
        for key, want in ref_row.items():
            if key in UNTIMED or not isinstance(want, (int, float)):
                continue
            got = row[key]
            assert math.isfinite(got) == math.isfinite(want), key
            if math.isfinite(want):
                assert got == pytest.approx(want, rel=1e-5, abs=1e-6), key
    assert w.keys() == ref_w.keys()
    for name in w:
        torch.testing.assert_close(w[name], ref_w[name], rtol=1e-5, atol=1e-6, msg=name)
    return logs


# ---------------------------------------------------------------- DPOTrainer, every loss type

def test_the_loss_types_are_read_from_trl():
    types = fp_trl.dpo_loss_types()
    assert {"sigmoid", "ipo", "hinge", "sft", "aot", "apo_zero", "discopop"} <= set(types), types


DPO_TYPES = fp_trl.dpo_loss_types()
# TRL checks these: exo_pair needs label smoothing > 0, robust one in [0, 0.5)
SMOOTHING = {"exo_pair": 0.1, "robust": 0.1}


@pytest.mark.parametrize("loss_type", DPO_TYPES)
def test_dpo_trainer(loss_type, args, monkeypatch):
    def make():
        cfg = args(DPOConfig, per_device_train_batch_size=4, loss_type=loss_type,
                   label_smoothing=SMOOTHING.get(loss_type, 0.0))
        return DPOTrainer(model=T.model(), ref_model=T.model(), args=cfg, train_dataset=T.preference_data(),
                          processing_class=T.tokenizer())
    # every TRL loss type goes through preference_loss; the pair-coupled ones on the recompute path
    compare(make, monkeypatch, loss="preference_loss", fused=loss_type not in ("aot", "aot_unpaired"))


@pytest.mark.parametrize("opts", [dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.3], use_weighting=True),
                                  dict(loss_type="sigmoid", ld_alpha=0.3),
                                  dict(loss_type=["ipo", "sft"], loss_weights=[1.0, 0.5], ld_alpha=0.6),
                                  dict(loss_type="robust", label_smoothing=0.2, use_weighting=True, ld_alpha=0.0)],
                         ids=["wpo-list", "ld-alpha", "ld-alpha-nll", "robust-wpo-ld"])
def test_dpo_trainer_options(opts, args, monkeypatch):
    """WPO (use_weighting reads log_sum_sq_probs), LD-DPO (ld_alpha), weighted lists: through
    preference_loss; an NLL term with ld_alpha on its recompute path."""
    def make():
        cfg = args(DPOConfig, per_device_train_batch_size=4, **opts)
        return DPOTrainer(model=T.model(), ref_model=T.model(), args=cfg, train_dataset=T.preference_data(),
                          processing_class=T.tokenizer())
    compare(make, monkeypatch, loss="preference_loss", fused="sft" not in opts["loss_type"])


def test_dpo_trainer_with_precomputed_reference_log_probs(args, monkeypatch):
    def make():
        cfg = args(DPOConfig, per_device_train_batch_size=4, loss_type="sigmoid", precompute_ref_log_probs=True)
        return DPOTrainer(model=T.model(), ref_model=T.model(), args=cfg, train_dataset=T.preference_data(),
                          processing_class=T.tokenizer())
    compare(make, monkeypatch, loss="preference_loss", fused=True)


@pytest.mark.parametrize("opts", [dict(loss_type="sigmoid", label_smoothing=0.1),
                                  dict(loss_type="hinge", f_divergence_type="js_divergence")],
                         ids=["sigmoid-label-smoothing", "f-divergence"])
def test_what_preference_loss_cannot_serve_runs_trls_loss_code(opts, args, monkeypatch):
    """TRL's sigmoid ignores label_smoothing (fusedpref's is cDPO); f-divergences: TRL's own loss
    code on fusedpref's per-token head, the same numbers."""
    def make():
        cfg = args(DPOConfig, per_device_train_batch_size=4, **opts)
        return DPOTrainer(model=T.model(), ref_model=T.model(), args=cfg, train_dataset=T.preference_data(),
                          processing_class=T.tokenizer())
    compare(make, monkeypatch, loss=None, fused=False)


def _step_flops(trainer, patch):
    """Matmul FLOPs (helpers.matmul_flops: FlopCounterMode + the in-place products TRL's head
    accumulates with) of one loss + backward on the trainer's first batch."""
    with T.patched(patch):
        inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        flops = matmul_flops(lambda: trainer.compute_loss(trainer.model, inputs).backward())
    trainer.model.zero_grad(set_to_none=True)
    return flops


@pytest.mark.parametrize("compact", [True, False], ids=["valid-rows", "every-row"])
def test_a_patched_dpo_step_does_at_most_083x_the_matmul_flops_of_trls_head(compact, args, monkeypatch):
    """TRL's head scores the valid rows on Triton devices and every row elsewhere (compact); the
    same step with fusedpref's gradients in forward does 6 + 2 N D V in the heads where TRL's does
    8 + 2 (the backbone's FLOPs are the same in both: a head-heavy tiny model, V = 32768 with hidden
    32, as a large vocabulary is next to a real model's backbone; at V = 8192 the ratio is 0.836)."""
    import trl.trainer.utils as utils

    monkeypatch.setattr(utils, "_use_triton", lambda device: compact)
    cfg = args(DPOConfig, per_device_train_batch_size=4, loss_type="sigmoid")
    trainer = DPOTrainer(model=T.model(vocab=32768), ref_model=T.model(vocab=32768), args=cfg,
                         train_dataset=T.preference_data(), processing_class=T.tokenizer())
    trl_flops, fused_flops = _step_flops(trainer, False), _step_flops(trainer, True)
    ratio = fused_flops / trl_flops
    print(f"matmul FLOPs per step: TRL's head {trl_flops:.4g}, fusedpref {fused_flops:.4g}, ratio {ratio:.3f}")
    assert ratio <= 0.83, ratio


# ---------------------------------------------------------------- the other trainers

def test_kto_trainer(args, monkeypatch):
    def make():
        return KTOTrainer(model=T.model(), ref_model=T.model(), args=args(KTOConfig, per_device_train_batch_size=8),
                          train_dataset=T.unpaired_data(), processing_class=T.tokenizer())
    compare(make, monkeypatch, loss="kto_loss", fused=True)


def test_kto_trainer_with_precomputed_reference_log_probs_and_weights(args, monkeypatch):
    def make():
        cfg = args(KTOConfig, per_device_train_batch_size=8, precompute_ref_log_probs=True, desirable_weight=1.5,
                   undesirable_weight=0.7)
        return KTOTrainer(model=T.model(), ref_model=T.model(), args=cfg, train_dataset=T.unpaired_data(),
                          processing_class=T.tokenizer())
    compare(make, monkeypatch, loss="kto_loss", fused=True)


def test_kto_trainer_apo_zero_unpaired_runs_trls_loss_code(args, monkeypatch):
    def make():
        cfg = args(KTOConfig, per_device_train_batch_size=8, loss_type="apo_zero_unpaired")
        return KTOTrainer(model=T.model(), ref_model=T.model(), args=cfg, train_dataset=T.unpaired_data(),
                          processing_class=T.tokenizer())
    compare(make, monkeypatch, loss=None)


def test_sft_trainer(args, monkeypatch):
    def make():
        return SFTTrainer(model=T.model(), args=args(SFTConfig, per_device_train_batch_size=4),
                          train_dataset=T.text_data(), processing_class=T.tokenizer())
    compare(make, monkeypatch)


def test_grpo_trainer_with_an_entropy_bonus(args, monkeypatch):
    """entropy_coef != 0 differentiates the entropy output of the head (it raised before)."""
    def make():
        cfg = args(GRPOConfig, per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
                   entropy_coef=0.1)
        return GRPOTrainer(model=T.model(), reward_funcs=T.length_reward, args=cfg, train_dataset=T.prompt_data(),
                           processing_class=T.tokenizer())
    logs = compare(make, monkeypatch)
    assert logs[0]["entropy_coef"] == 0.1


def test_rloo_trainer_with_a_reference(args, monkeypatch, tmp_path):
    path = tmp_path / "tiny"
    T.model().save_pretrained(path)

    def make():
        cfg = args(RLOOConfig, per_device_train_batch_size=4, num_generations=2, max_completion_length=6, beta=0.05)
        return RLOOTrainer(model=str(path), reward_funcs=T.length_reward, args=cfg, train_dataset=T.prompt_data(),
                           processing_class=T.tokenizer())
    compare(make, monkeypatch)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_distillation_trainer(beta, args, monkeypatch):
    """A teacher of another hidden size; forward KL, JSD, reverse KL."""
    def make():
        cfg = args(DistillationConfig, per_device_train_batch_size=4, max_completion_length=6, beta=beta)
        return DistillationTrainer(model=T.model(), teacher_model=T.model(seed=1, hidden=48), args=cfg,
                                   train_dataset=T.prompt_data(), processing_class=T.tokenizer())
    compare(make, monkeypatch, head="divergence")


def test_lora_dpo_takes_the_one_pass_frozen_head_path(args, monkeypatch):
    """PEFT leaves the LM head frozen: the policy's head call takes the one-pass path (4 N D V)
    and the run matches TRL's own head."""
    peft = optional("peft")
    from fusedpref import chunked

    calls = []
    original = chunked.logprob_partials_frozen
    monkeypatch.setattr(chunked, "logprob_partials_frozen", lambda *a, **k: calls.append(1) or original(*a, **k))

    def make():
        cfg = args(DPOConfig, per_device_train_batch_size=4)
        return DPOTrainer(model=T.model(), ref_model=None, args=cfg, train_dataset=T.preference_data(),
                          processing_class=T.tokenizer(),
                          peft_config=peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    compare(make, monkeypatch, loss="preference_loss", fused=False)
    assert len(calls) == 2          # the policy's forward of each step; the reference runs under no_grad


def test_a_lora_adapter_on_the_lm_head_is_a_clear_error():
    """A PEFT adapter on lm_head itself: the fused head would read the frozen base weight and drop the
    adapter's term silently. TRL 1.16's trainers refuse it when built; TRL's add_fused_lm_head used
    directly (a custom loop) does not: after patch_trl() its fused forward raises, naming the module,
    while the plain forward (generation) still works."""
    peft = optional("peft")
    with T.patched(True):
        from trl.trainer import utils

        assert utils.add_fused_lm_head._fusedpref
        model = T.model()
        utils.add_fused_lm_head(model)
        lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
        ids = torch.randint(0, len(T.VOCAB), (2, 8))
        with pytest.raises(ValueError, match="adapter on the LM head.*'lm_head' is in the adapter's target_modules"):
            lora(input_ids=ids, labels=ids, fused_lm_head=True)
        assert lora(input_ids=ids).logits.shape[:2] == (2, 8)
        plain = T.model()
        utils.add_fused_lm_head(plain)
        assert torch.isfinite(plain(input_ids=ids, labels=ids, fused_lm_head=True).log_probs).all()
