"""TRL's own trainers after fusedpref.integrations.trl.patch_trl(), on the CPU (tiny random-weight
Llama models from a config, an offline word-level tokenizer, fp32): two optimizer steps patched
vs unpatched from identical weights give the same logged metrics (rel 1e-5) and the same
weights, fusedpref's heads ran, and TRL's own head functions were never called."""
import math

import pytest
import torch
from helpers import optional

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


def compare(make_trainer, monkeypatch, *, head="logprob"):
    """Trains twice from identical weights, TRL's heads and fusedpref's; compares every logged
    number and every trainable weight; returns the patched run's logs."""
    ref_logs, ref_w, _ = T.train(make_trainer, False)
    calls = {"logprob": 0, "divergence": 0}
    for cls, key in ((fp_trl.FusedLogProbHead, "logprob"), (fp_trl.FusedDivergence, "divergence")):
        original = cls.apply

        def counted(*a, _original=original, _key=key, **k):
            calls[_key] += 1
            return _original(*a, **k)
        monkeypatch.setattr(cls, "apply", staticmethod(counted))
    with monkeypatch.context() as m:
        m.setattr(ChunkedLogProbFunction, "apply", _never("ChunkedLogProbFunction"))
        m.setattr(ChunkedDivergenceFunction, "apply", _never("ChunkedDivergenceFunction"))
        logs, w, _ = T.train(make_trainer, True)
    assert calls[head] > 0, f"fusedpref's {head} head did not run"
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
    compare(make, monkeypatch)


def test_dpo_trainer_wpo_weights_and_a_loss_list(args, monkeypatch):
    """use_weighting reads log_sum_sq_probs (WPO); a weighted list of losses."""
    def make():
        cfg = args(DPOConfig, per_device_train_batch_size=4, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.3],
                   use_weighting=True)
        return DPOTrainer(model=T.model(), ref_model=T.model(), args=cfg, train_dataset=T.preference_data(),
                          processing_class=T.tokenizer())
    compare(make, monkeypatch)


# ---------------------------------------------------------------- the other trainers

def test_kto_trainer(args, monkeypatch):
    def make():
        return KTOTrainer(model=T.model(), ref_model=T.model(), args=args(KTOConfig, per_device_train_batch_size=8),
                          train_dataset=T.unpaired_data(), processing_class=T.tokenizer())
    compare(make, monkeypatch)


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
    compare(make, monkeypatch)
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
