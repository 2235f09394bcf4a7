"""fusedpref under TRL's fused LM head (trl.trainer.utils.add_fused_lm_head): the same per-token
outputs and gradients as TRL's own head, on a tiny Llama, on the CPU (torch backend)."""
import pytest
from helpers import optional
import torch

trl_utils = optional("trl.trainer.utils")
transformers = optional("transformers")
from trl.kernels import ChunkedLogProbFunction  # noqa: E402

import fusedpref.integrations.trl as fp_trl  # noqa: E402

OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


@pytest.fixture
def unpatched():
    fp_trl.unpatch_trl()
    yield
    fp_trl.unpatch_trl()


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    trl_utils.add_fused_lm_head(model, outputs=OUTPUTS)
    return model


def _run(model, ids, labels, g):
    model.zero_grad()
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    (out.log_probs * g).sum().backward()
    grads = [model.lm_head.weight.grad.clone(), model.model.embed_tokens.weight.grad.clone()]
    return [getattr(out, k).detach() for k in OUTPUTS], grads


def test_patched_trl_head_matches_trls_own(unpatched, monkeypatch):
    model = _tiny_model()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (3, 20), generator=gen)
    labels = ids.clone()
    labels[:, :7] = -100                      # prompt
    g = torch.randn(3, 19, generator=gen)
    ref_out, ref_grads = _run(model, ids, labels, g)

    calls = []
    original_apply = fp_trl.FusedLogProbHead.apply
    monkeypatch.setattr(fp_trl.FusedLogProbHead, "apply",
                        staticmethod(lambda *a, **k: calls.append(1) or original_apply(*a, **k)))
    fp_trl.patch_trl()
    fp_trl.patch_trl()                        # idempotent
    out, grads = _run(model, ids, labels, g)
    assert calls, "TRL's head did not go through fusedpref"
    for name, a, b in zip(OUTPUTS, out, ref_out):
        if name == "is_top1":
            assert a.dtype == torch.bool and torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    fp_trl.unpatch_trl()
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction


def _head(seed=2, n=23, d=24, v=211):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen)
    w = torch.randn(v, d, generator=gen) / d ** 0.5 * 3
    b = torch.randn(v, generator=gen) * 0.3
    y = torch.randint(0, v, (n,), generator=gen)
    return h, w, b, y


@pytest.mark.parametrize("temperature,softcap,scale", [(0.7, None, 1.3), (1.0, 5.0, 1.3), (1.0, None, 1.0)])
def test_temperature_logit_scale_softcap_match_trl(temperature, softcap, scale):
    h0, w0, b0, y = _head()
    g = torch.randn(y.shape[0], generator=torch.Generator().manual_seed(4))
    results = []
    for fn in (ChunkedLogProbFunction.apply, fp_trl.FusedLogProbHead.apply):
        h, w, b = (t.clone().requires_grad_() for t in (h0, w0, b0))
        out = fn(h, w, b, y, temperature, 64, softcap, scale, OUTPUTS)
        grads = torch.autograd.grad(out[0], (h, w, b), g)
        results.append(([o for o in out if o is not None], grads))
    (ref_out, ref_grads), (out, grads) = results
    for a, b in zip(out, ref_out):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_what_fusedpref_does_not_compute_goes_to_trl():
    h, w, b, y = _head()
    assert not fp_trl.FusedLogProbHead.supports(1.0, None, ("log_probs", "log_sum_sq_probs"))
    assert not fp_trl.FusedLogProbHead.supports(0.7, 5.0, ("log_probs",))
    out = fp_trl.FusedLogProbHead.apply(h, w, b, y, 1.0, 64, None, 1.0, ("log_probs", "log_sum_sq_probs"))
    ref = ChunkedLogProbFunction.apply(h, w, b, y, 1.0, 64, None, 1.0, ("log_probs", "log_sum_sq_probs"))
    assert out[2] is not None
    torch.testing.assert_close(out[2], ref[2])
    out = fp_trl.FusedLogProbHead.apply(h, w, b, y, 0.7, 64, 5.0, 1.0, ("log_probs",))
    ref = ChunkedLogProbFunction.apply(h, w, b, y, 0.7, 64, 5.0, 1.0, ("log_probs",))
    torch.testing.assert_close(out[0], ref[0])


def test_a_gradient_into_the_entropy_raises():
    h, w, b, y = _head()
    h.requires_grad_()
    logp, entropy, *_ = fp_trl.FusedLogProbHead.apply(h, w, b, y, 1.0, 64, None, 1.0, OUTPUTS)
    (logp.sum() + entropy.detach().sum()).backward()     # the entropy as a statistic: fine
    _, entropy, *_ = fp_trl.FusedLogProbHead.apply(h, w, b, y, 1.0, 64, None, 1.0, OUTPUTS)
    with pytest.raises(RuntimeError, match="entropy as a statistic"):
        entropy.sum().backward()


def test_autocast_runs_in_the_autocast_dtype_and_reaches_fp32_weights():
    """Under bf16 autocast both heads compute with bf16 operands; against the float64 oracle at the
    bf16-rounded operands, fusedpref's error is within the rule of TRL's own (the same-dtype eager)."""
    from conftest import assert_within
    from fusedpref.reference import eager_logprobs

    h0, w0, b0, y = _head()
    results = []
    for fn in (ChunkedLogProbFunction.apply, fp_trl.FusedLogProbHead.apply):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(h, w, None, y, 1.0, 64, None, 1.0, ("log_probs",))
        dw, = torch.autograd.grad(out[0].sum(), (w,))
        results.append((out[0].float(), dw))
    (trl_out, trl_dw), (got, dw) = results
    assert dw.dtype == torch.float32
    wo = w0.bfloat16().double().requires_grad_()
    oracle = eager_logprobs(h0.bfloat16().double(), wo, y)
    oracle_dw, = torch.autograd.grad(oracle.sum(), (wo,))
    assert_within("logp", got, trl_out, oracle, torch.bfloat16)
    assert_within("dW", dw, trl_dw, oracle_dw, torch.bfloat16)


def test_two_dpo_trainer_steps_match_trls_own_head(unpatched, tmp_path, monkeypatch):
    """The drop-in inside TRL's DPOTrainer (policy + reference model, two optimizer steps, fp32):
    the same logged loss and metrics, and the same LM head afterwards."""
    datasets = optional("datasets")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from trl import DPOConfig, DPOTrainer

    words = "the a cat dog sat ran on mat rug big small red blue yes no why how".split()
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                     unk_token="<unk>")
    data = datasets.Dataset.from_dict({
        "prompt": ["the cat sat on", "a dog ran on", "why the big", "how a small"],
        "chosen": [" the mat", " the rug", " red dog", " blue cat"],
        "rejected": [" a dog", " yes no", " no no", " the the"]})
    calls = []
    original_apply = fp_trl.FusedLogProbHead.apply
    monkeypatch.setattr(fp_trl.FusedLogProbHead, "apply",
                        staticmethod(lambda *a, **k: calls.append(1) or original_apply(*a, **k)))

    def train(patched):
        fp_trl.patch_trl() if patched else fp_trl.unpatch_trl()
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                       max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1)
        model, ref = transformers.LlamaForCausalLM(cfg), transformers.LlamaForCausalLM(cfg)
        args = DPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                         logging_steps=1, save_strategy="no", use_cpu=True, learning_rate=1e-3, seed=0,
                         bf16=False)   # TRL's default on the CPU is bf16 autocast: agreement only to bf16
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.train()
        return [row for row in trainer.state.log_history if "loss" in row], model.lm_head.weight.detach().clone()

    ref_logs, ref_w = train(False)
    assert not calls
    logs, w = train(True)
    assert len(calls) == 4          # policy and reference forward, two steps
    assert len(logs) == len(ref_logs) == 2
    for row, ref_row in zip(logs, ref_logs):
        for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "entropy", "logits/chosen",
                    "mean_token_accuracy", "grad_norm"):
            assert row[key] == pytest.approx(ref_row[key], rel=1e-5, abs=1e-6), key
    torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-6)
