"""EXPO (loss_type="expo") through TRL's own DPOTrainer after patch_trl(): the exact vocabulary
KL(pi_ref || pi_theta) from the policy's and the reference's last hidden states (one pass over
both heads), a reference model or the LoRA policy with adapters disabled, a clear error when the
reference log-probs are precomputed, logit-scaled models, TRL's compacted rows. CPU, tiny random
models, offline."""

import pytest
import torch
from helpers import optional

optional("trl")
optional("datasets")
import trl_trainers as T  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

import fusedpref  # noqa: E402
import fusedpref.integrations.trl as fp_trl  # noqa: E402

pytestmark = pytest.mark.slow   # TRL trainers


@pytest.fixture
def patched():
    fp_trl.patch_trl()
    yield
    fp_trl.unpatch_trl()


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=2, report_to=[], logging_steps=1, save_strategy="no",
                use_cpu=True, learning_rate=1e-3, seed=0, bf16=False, per_device_train_batch_size=4,
                loss_type="expo", beta=0.5)
    return DPOConfig(**{**base, **kw})


def _batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def _hidden(model, inputs):
    out = model.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return out.last_hidden_state[:, :-1]


def _trainer_and_direct(trainer, **loss_kw):
    """(the trainer's loss on one batch, preference_loss's (loss, metrics) on the same hidden states)."""
    inputs = _batch(trainer)
    loss_trainer = trainer.compute_loss(trainer.model, inputs)
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)[:, 1:]
    with torch.no_grad():
        ref_h = _hidden(trainer.ref_model, inputs)
    return loss_trainer, fusedpref.preference_loss(_hidden(trainer.model, inputs), trainer.model.lm_head.weight,
                                                   labels, beta=0.5, ref_hidden=ref_h,
                                                   ref_weight=trainer.ref_model.lm_head.weight, **loss_kw)


@pytest.mark.parametrize("loss", ["expo", "expo+sft"])
def test_the_trainers_loss_is_fusedprefs_expo_on_the_same_hidden_states(loss, patched, tmp_path):
    types, weights = (["expo"], None) if loss == "expo" else (["expo", "sft"], [1.0, 0.25])
    trainer = DPOTrainer(model=T.model(), ref_model=T.model(seed=1), args=_config(tmp_path, loss_type=types,
                                                                                  loss_weights=weights),
                         train_dataset=T.preference_data(), processing_class=T.tokenizer())
    loss_trainer, (want, metrics) = _trainer_and_direct(trainer, loss_type=types, loss_weights=weights)
    torch.testing.assert_close(loss_trainer, want, rtol=1e-6, atol=1e-7)
    logged = trainer._metrics["train"]
    for key in ("kl/chosen", "kl/rejected", "rewards/accuracies", "entropy", "logps/chosen", "mean_token_accuracy"):
        assert logged[key][-1] == pytest.approx(metrics[key].item(), rel=1e-6), key
    assert metrics["kl/chosen"] > 0


def _learns(trainer):
    trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert len(rows) == 20
    first, last = rows[:3], rows[-3:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "loss") < mean(first, "loss") - 0.05, (mean(first, "loss"), mean(last, "loss"))
    assert mean(last, "rewards/accuracies") > mean(first, "rewards/accuracies")
    assert all(r["kl/chosen"] >= 0 for r in rows)
    return rows


def test_twenty_steps_lower_the_loss_and_raise_the_accuracies(patched, tmp_path):
    trainer = DPOTrainer(model=T.model(), ref_model=T.model(), args=_config(tmp_path, max_steps=20,
                                                                            learning_rate=3e-3),
                         train_dataset=T.preference_data(), processing_class=T.tokenizer())
    _learns(trainer)


def test_a_lora_policy_whose_reference_is_the_base_model(patched, tmp_path):
    peft = optional("peft")
    trainer = DPOTrainer(model=T.model(), ref_model=None,
                         args=_config(tmp_path, max_steps=20, learning_rate=3e-2),
                         train_dataset=T.preference_data(), processing_class=T.tokenizer(),
                         peft_config=peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj",
                                                                                         "up_proj", "down_proj"]))
    assert trainer.ref_model is None
    rows = _learns(trainer)
    # at step 1 the adapters are zero: the policy is the reference and the KL is 0
    assert rows[0]["kl/chosen"] == pytest.approx(0.0, abs=1e-6)


def test_precomputed_reference_log_probs_are_a_clear_error_when_the_trainer_is_built(patched, tmp_path):
    """No silent change of objective: the exact KL needs the reference's hidden states."""
    with pytest.raises(ValueError, match="precompute_ref_log_probs=True.*Set precompute_ref_log_probs=False"):
        DPOTrainer(model=T.model(), ref_model=T.model(seed=1),
                   args=_config(tmp_path, precompute_ref_log_probs=True, max_steps=3),
                   train_dataset=T.preference_data(), processing_class=T.tokenizer())


def test_a_model_with_a_logit_scale_and_a_soft_cap(patched, tmp_path):
    """TRL's softcap(s (h W^T)) with s = 0.5 and cap 3 on both models: the trainer's EXPO loss equals
    the float64 oracle with the converted transforms (cap c / |s|, scale s), and 2 steps run (before:
    NotImplementedError for any logit scale)."""
    policy, reference = T.model(), T.model(seed=1)
    for m in (policy, reference):
        m.config.logit_scale, m.config.final_logit_softcapping = 0.5, 3.0
    trainer = DPOTrainer(model=policy, ref_model=reference, args=_config(tmp_path),
                         train_dataset=T.preference_data(), processing_class=T.tokenizer())
    inputs = _batch(trainer)
    loss_trainer = trainer.compute_loss(trainer.model, inputs)
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)[:, 1:]
    with torch.no_grad():
        ref_h = _hidden(trainer.ref_model, inputs)
    from fusedpref import reference as R

    want, _ = R.eager_preference_loss(_hidden(trainer.model, inputs).double(), trainer.model.lm_head.weight.double(),
                                      labels, loss_type="expo", beta=0.5, ref_hidden=ref_h.double(),
                                      ref_weight=trainer.ref_model.lm_head.weight.double(), softcap=3.0 / 0.5,
                                      logit_scale=0.5)
    torch.testing.assert_close(loss_trainer.double(), want, rtol=1e-5, atol=1e-6)
    trainer.train()
    assert [r for r in trainer.state.log_history if "loss" in r][-1]["kl/chosen"] >= 0


@pytest.mark.parametrize("compact", [False, True], ids=["every-row", "compacted-rows"])
def test_the_compacted_rows_branch_trl_takes_on_cuda(compact, patched, tmp_path, monkeypatch):
    """On Triton devices TRL scores only the valid positions (hidden_states[mask]); forced here on the
    CPU, the trainer's loss is the same as on every position."""
    import trl.trainer.utils as utils

    monkeypatch.setattr(utils, "_use_triton", lambda device: compact)
    trainer = DPOTrainer(model=T.model(), ref_model=T.model(seed=1), args=_config(tmp_path),
                         train_dataset=T.preference_data(), processing_class=T.tokenizer())
    loss_trainer, (want, _) = _trainer_and_direct(trainer, loss_type="expo")
    torch.testing.assert_close(loss_trainer, want, rtol=1e-6, atol=1e-7)


def test_unpatched_trl_does_not_know_expo(tmp_path):
    fp_trl.unpatch_trl()
    trainer = DPOTrainer(model=T.model(), ref_model=T.model(), args=_config(tmp_path),
                         train_dataset=T.preference_data(), processing_class=T.tokenizer())
    with pytest.raises(ValueError, match="Unknown loss type"):
        trainer.compute_loss(trainer.model, _batch(trainer))


def test_options_expo_does_not_support_are_clear_errors(patched, tmp_path):
    trainer = DPOTrainer(model=T.model(), ref_model=T.model(), args=_config(tmp_path, ld_alpha=0.5),
                         train_dataset=T.preference_data(), processing_class=T.tokenizer())
    with pytest.raises(ValueError, match="ld_alpha .* 'expo'"):
        trainer.compute_loss(trainer.model, _batch(trainer))
    trainer = DPOTrainer(model=T.model(), ref_model=T.model(), args=_config(tmp_path), train_dataset=T.preference_data(),
                         processing_class=T.tokenizer())
    with pytest.raises(NotImplementedError, match="'expo' .* return_outputs=True"):
        trainer.compute_loss(trainer.model, _batch(trainer), return_outputs=True)


def test_expo_with_wpo_weights_is_fusedprefs_on_the_same_hidden_states(patched, tmp_path):
    """use_weighting (WPO) multiplies each pair's EXPO loss by its weight, as TRL does for its losses."""
    trainer = DPOTrainer(model=T.model(), ref_model=T.model(seed=1), args=_config(tmp_path, use_weighting=True),
                         train_dataset=T.preference_data(), processing_class=T.tokenizer())
    loss_trainer, (want, _) = _trainer_and_direct(trainer, loss_type="expo", use_weighting=True)
    _, (plain, _) = _trainer_and_direct(trainer, loss_type="expo")
    torch.testing.assert_close(loss_trainer, want, rtol=1e-6, atol=1e-7)
    assert abs(plain.item() - want.item()) > 1e-4
