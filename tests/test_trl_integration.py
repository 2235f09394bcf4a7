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


ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _trl_order_oracle(h, w, b, y, temperature, softcap, scale):
    """TRL's logits softcap(s (h W^T + b)) / T in float64, and every output of its head."""
    z = (h.double() @ w.double().t() + b.double()) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lp = (z / temperature).log_softmax(-1)
    p = lp.exp()
    return (lp.gather(-1, y[:, None])[:, 0], -(p * lp).sum(-1), torch.logsumexp(2 * lp, -1),
            (z / temperature).mean(-1), (z.argmax(-1) == y))


@pytest.mark.parametrize("temperature,softcap,scale", [(0.7, None, 1.3), (1.0, 5.0, 1.3), (1.0, None, 1.0),
                                                       (0.7, 5.0, 1.3), (1.6, 30.0, 0.5)])
def test_every_output_and_both_gradients_match_trl(temperature, softcap, scale):
    """Every output TRL's head computes, with temperature, logit scale and soft-cap in TRL's order
    (no fallback), and the gradients of a loss on both the log-probs and the entropy: against the
    float64 oracle, within the suite's rule of TRL's own error (TRL's head as "eager")."""
    from helpers import assert_within

    h0, w0, b0, y = _head()
    gen = torch.Generator().manual_seed(4)
    g_lp, g_h = torch.randn(y.shape[0], generator=gen), torch.randn(y.shape[0], generator=gen)
    results = []
    for fn in (ChunkedLogProbFunction.apply, fp_trl.FusedLogProbHead.apply, _trl_order_oracle):
        h, w, b = (t.clone().requires_grad_() for t in (h0, w0, b0))
        if fn is _trl_order_oracle:
            out = fn(h, w, b, y, temperature, softcap, scale)
        else:
            out = fn(h, w, b, y, temperature, 64, softcap, scale, ALL_OUTPUTS)
        grads = torch.autograd.grad((out[0], out[1]), (h, w, b), (g_lp.to(out[0].dtype), g_h.to(out[0].dtype)))
        results.append((out, grads))
    (trl_out, trl_grads), (out, grads), (oracle, oracle_grads) = results
    for name, a, b in zip(ALL_OUTPUTS, out, trl_out):
        assert a.requires_grad == b.requires_grad, name
    for name, a, e, o in zip(ALL_OUTPUTS, out, trl_out, oracle):
        if name == "is_top1":
            assert torch.equal(a, e) and torch.equal(a, o), name
        else:
            assert_within(name, a.detach(), e.detach(), o.detach(), torch.float32)
    for name, a, e, o in zip(("dH", "dW", "db"), grads, trl_grads, oracle_grads):
        assert_within(name, a, e, o, torch.float32)


def test_only_an_entropy_gradient_matches_trl():
    """GRPO's entropy bonus alone: no gradient reaches the log-probs."""
    h0, w0, b0, y = _head(seed=5)
    results = []
    for fn in (ChunkedLogProbFunction.apply, fp_trl.FusedLogProbHead.apply):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = fn(h, w, None, y, 1.0, 64, None, 1.0, ("log_probs", "entropy"))
        results.append(torch.autograd.grad(out[1].sum(), (h, w)))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.2])
@pytest.mark.parametrize("heads", ["plain", "temperature-scales-caps-bias"])
def test_divergence_matches_trl(beta, heads):
    """FusedDivergence against TRL's ChunkedDivergenceFunction: student of hidden 24, teacher of 40."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    hs0, ws0, bs0, _ = _head(seed=7, d=24)
    ht, wt, bt, _ = _head(seed=8, d=40)
    fancy = heads != "plain"
    opts = (1.5, 1.2, 20.0, 0.8, 10.0) if fancy else (1.0, 1.0, None, 1.0, None)
    g = torch.randn(hs0.shape[0], generator=torch.Generator().manual_seed(9))
    results = []
    for fn in (ChunkedDivergenceFunction.apply, fp_trl.FusedDivergence.apply):
        hs, ws, bs = (t.clone().requires_grad_() for t in (hs0, ws0, bs0))
        div, ent = fn(hs, ws, bs if fancy else None, ht, wt, bt if fancy else None, beta, *opts)
        grads = torch.autograd.grad(div, (hs, ws, bs) if fancy else (hs, ws), g)
        results.append((div.detach(), ent, grads))
    (rd, re, rg), (d, e, gr) = results
    assert not e.requires_grad
    # the float64 oracle, TRL's transform mapped to fusedpref's (cap c / |s|, scale s / T)
    from helpers import assert_within
    from fusedpref.reference import eager_divergence, eager_token_stats

    t, s_scale, s_cap, t_scale, t_cap = opts
    cap, scale = fp_trl._transform(s_scale, s_cap, t)
    rcap, rscale = fp_trl._transform(t_scale, t_cap, t)
    hs, ws, bs = (x.double().requires_grad_() for x in (hs0, ws0, bs0))
    rows = torch.zeros(hs.shape[0], dtype=torch.long)
    od = eager_divergence(hs, ws, ht.double(), wt.double(), rows, beta=beta, bias=bs if fancy else None,
                          ref_bias=bt.double() if fancy else None, softcap=cap, ref_softcap=rcap, logit_scale=scale,
                          ref_logit_scale=rscale)
    og = torch.autograd.grad(od, (hs, ws, bs) if fancy else (hs, ws), g.double())
    oe = eager_token_stats(hs, ws, rows, bs if fancy else None, softcap=cap, logit_scale=scale)[:, 1]
    assert_within("divergence", d, rd, od.detach(), torch.float32)
    assert_within("entropy", e, re, oe.detach(), torch.float32)
    for name, a, b, o in zip(("dH", "dW", "db"), gr, rg, og):
        assert_within(name, a, b, o, torch.float32)


def test_patch_swaps_every_head_and_unpatch_restores_them(unpatched):
    import trl.kernels.chunked_divergence as cd
    import trl.trainer.distillation_trainer as dt
    from trl import DPOTrainer

    original_loss = DPOTrainer.__dict__["_compute_loss"]
    fp_trl.patch_trl()
    fp_trl.patch_trl()                        # idempotent
    assert trl_utils._ChunkedLogProbFunction is fp_trl.FusedLogProbHead
    assert cd.ChunkedDivergenceFunction is dt.ChunkedDivergenceFunction is fp_trl.FusedDivergence
    assert DPOTrainer.__dict__["_compute_loss"] is not original_loss and fp_trl.is_patched()
    fp_trl.unpatch_trl()
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    assert cd.ChunkedDivergenceFunction is dt.ChunkedDivergenceFunction is not fp_trl.FusedDivergence
    assert DPOTrainer.__dict__["_compute_loss"] is original_loss and not fp_trl.is_patched()


def test_patch_trl_registers_trls_zero3_gather_around_the_backward_recompute(unpatched):
    """Under DeepSpeed ZeRO-3 TRL gathers the partitioned head with maybe_gather_lm_head_ctx; after
    patch_trl() fusedpref's backward recompute runs inside the same gather (the one-pass frozen
    path reads no weight in backward and gathers nothing)."""
    import contextlib

    from fusedpref import functions

    fp_trl.patch_trl()
    assert functions._WEIGHT_GATHER is trl_utils.maybe_gather_lm_head_ctx
    seen = []

    @contextlib.contextmanager
    def spy(*params):
        seen.append(params)
        yield

    functions.set_weight_gather(spy)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 40, (6,), generator=g)
    out = fp_trl.FusedLogProbHead.apply(h, w, None, y, 1.0, 64, None, 1.0, ("log_probs",))
    assert not seen                                    # the forward runs inside the caller's gather
    out[0].sum().backward()
    assert len(seen) == 1 and seen[0][0] is w and seen[0][1] is None
    seen.clear()
    out = fp_trl.FusedLogProbHead.apply(h, w.detach(), None, y, 1.0, 64, None, 1.0, ("log_probs",))
    out[0].sum().backward()
    assert not seen                                    # frozen one-pass backward: dH = g d
    fp_trl.unpatch_trl()
    assert functions._WEIGHT_GATHER is None
