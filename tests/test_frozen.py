"""The frozen-head one-pass path (hidden requires grad, the head does not: LoRA): the forward also
accumulates dlogp/dh, backward is one multiply. Against the standard frozen path
(frozen="standard") and the float64 oracle, both backends, one and many chunks."""
import pytest
import torch
from helpers import DEVICE, assert_within
from helpers import leaves, make_head

import fusedpref
from fusedpref import chunked
from fusedpref.reference import as_float64, eager_divergence, eager_kl, eager_logprobs, eager_token_stats

pytestmark = pytest.mark.usefixtures("chunking")

BACKENDS = ["torch", "triton"]
HEADS = {"plain": (False, None, None), "bias-cap": (True, 4.0, None), "bias-cap-scale": (True, 30.0, 1 / 0.7)}


def _spy(monkeypatch, backend):
    """Counts calls of the backend's one-pass frozen forward."""
    from fusedpref import ops

    module = ops if backend == "triton" else chunked
    calls = []
    for name in ("logprob_partials_frozen", "kl_partials_frozen"):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head", list(HEADS))
def test_one_pass_equals_the_standard_path_and_the_oracle(backend, dtype, head, monkeypatch):
    bias, softcap, scale = HEADS[head]
    h0, w, b, y = make_head((3, 13), 40, 1009, dtype, bias=bias, seed=11, scale=3.0)
    g = torch.randn(3, 13, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    calls = _spy(monkeypatch, backend)
    got = {}
    for path in ("one-pass", "standard"):
        h, = leaves(h0)
        logp, stats = fusedpref.LinearLogProbs.apply(h, w, y, b, -100, softcap, backend, True, scale, frozen=path)
        dh, = torch.autograd.grad(logp, (h,), g)
        got[path] = (logp, stats, dh)
    assert calls == ["logprob_partials_frozen"], calls          # one-pass only when asked
    he, = leaves(h0)
    e = eager_logprobs(he, w, y, b, softcap=softcap, logit_scale=scale)
    e_dh, = torch.autograd.grad(e, (he,), g)
    ho, = as_float64(*leaves(h0))
    wo, bo = w.double(), None if b is None else b.double()
    o = eager_logprobs(ho, wo, y, bo, softcap=softcap, logit_scale=scale)
    o_dh, = torch.autograd.grad(o, (ho,), g.double())
    o_st = eager_token_stats(ho, wo, y, bo, softcap=softcap, logit_scale=scale)
    logp, stats, dh = got["one-pass"]
    assert dh.dtype == dtype and (dh[y == -100] == 0).all()
    assert_within("logp", logp, e.detach(), o.detach(), dtype)
    assert_within("dH", dh, e_dh, o_dh, dtype)
    assert_within("dH vs standard", dh, got["standard"][2], o_dh, dtype)
    for col, name in ((1, "entropy"), (3, "log_sum_sq_probs")):
        assert_within(name, stats[..., col], got["standard"][1][..., col], o_st[..., col].detach(), dtype)
    assert torch.equal(stats[..., 2], got["standard"][1][..., 2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_taken_only_when_the_head_is_frozen(backend, monkeypatch):
    h0, w0, b0, y = make_head((2, 7), 24, 211, torch.float32, bias=True, seed=3)
    calls = _spy(monkeypatch, backend)
    cases = {"frozen": (True, False, False), "trainable weight": (True, True, False),
             "trainable bias": (True, False, True), "no hidden grad": (False, True, False)}
    taken = {}
    for name, (rh, rw, rb) in cases.items():
        calls.clear()
        h, w, b = (t.clone().requires_grad_(r) for t, r in zip((h0, w0, b0), (rh, rw, rb)))
        fusedpref.linear_logprobs(h, w, y, bias=b, backend=backend).sum().backward()
        taken[name] = bool(calls)
    assert taken == {"frozen": True, "trainable weight": False, "trainable bias": False, "no hidden grad": False}


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_entropy_gradient_on_the_frozen_path_is_exact(backend, monkeypatch):
    """The statistics' gradient is not in the saved direction: backward recomputes (standard)."""
    h0, w, _, y = make_head((2, 9), 24, 301, torch.float32, seed=5, scale=2.0)
    calls = _spy(monkeypatch, backend)
    h, = leaves(h0)
    logp, stats = fusedpref.LinearLogProbs.apply(h, w, y, None, -100, None, backend, True)
    dh, = torch.autograd.grad(logp.sum() + stats[..., 1].sum(), (h,))
    assert calls
    he, = leaves(h0)
    e_dh, = torch.autograd.grad(eager_logprobs(he, w, y).sum() + eager_token_stats(he, w, y)[..., 1].sum(), (he,))
    ho, = as_float64(*leaves(h0))
    o_dh, = torch.autograd.grad(eager_logprobs(ho, w.double(), y).sum()
                                + eager_token_stats(ho, w.double(), y)[..., 1].sum(), (ho,))
    assert_within("dH", dh, e_dh, o_dh, torch.float32)


def test_the_keyword_is_checked():
    h, w, _, y = make_head((2, 3), 8, 20, torch.float32)
    with pytest.raises(ValueError, match="frozen must be one of"):
        fusedpref.linear_logprobs(h.requires_grad_(), w, y, frozen="fast")
    with pytest.raises(ValueError, match="frozen='one-pass' needs a frozen head"):
        fusedpref.linear_logprobs(h, w.requires_grad_(), y, frozen="one-pass")
    with pytest.raises(ValueError, match="frozen='one-pass' serves the log-probs and the forward KL"):
        fusedpref.LinearDivergence.apply(h, w.detach(), h.detach(), w.detach(), y, None, None, -100, "auto", 0.5,
                                         frozen="one-pass")


# ---------------------------------------------------------------- EXPO's pass with a frozen policy head

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head", ["plain", "bias-cap"])
def test_logprobs_kl_one_pass_with_a_frozen_policy_head(backend, dtype, head, monkeypatch):
    bias, softcap, _ = HEADS[head]
    h0, w, b, y = make_head((3, 11), 40, 1009, dtype, bias=bias, seed=2, scale=3.0)
    rh, rw, rb, _ = make_head((3, 11), 32, 1009, dtype, bias=bias, seed=7, scale=3.0)
    gen = torch.Generator().manual_seed(3)
    g_lp, g_kl = (torch.randn(3, 11, generator=gen).to(DEVICE) for _ in range(2))
    calls = _spy(monkeypatch, backend)
    got = {}
    for path in ("one-pass", "standard"):
        h, = leaves(h0)
        logp, ref_logp, kl, stats = fusedpref.LinearLogProbsKL.apply(h, w, rh, rw, y, b, rb, -100, softcap, backend,
                                                                     True, frozen=path)
        dh, = torch.autograd.grad((logp, kl), (h,), (g_lp, g_kl))
        got[path] = (logp, ref_logp, kl, dh)
    assert calls == ["kl_partials_frozen"], calls

    def eager(h, w, b, rh, rw, rb):
        return eager_logprobs(h, w, y, b, softcap=softcap), eager_kl(h, w, rh, rw, y, b, rb, softcap=softcap)

    he, = leaves(h0)
    e = eager(he, w, b, rh, rw, rb)
    e_dh, = torch.autograd.grad(e, (he,), (g_lp, g_kl))
    ho, = as_float64(*leaves(h0))
    o = eager(ho, *as_float64(w, b, rh, rw, rb))
    o_dh, = torch.autograd.grad(o, (ho,), (g_lp.double(), g_kl.double()))
    logp, ref_logp, kl, dh = got["one-pass"]
    assert_within("logp", logp, e[0].detach(), o[0].detach(), dtype)
    assert_within("kl", kl, e[1].detach(), o[1].detach(), dtype)
    assert_within("dH", dh, e_dh, o_dh, dtype)
    assert_within("dH vs standard", dh, got["standard"][3], o_dh, dtype)
    # the reference's log-probs do not depend on the policy's path (the torch backend's chunk widths
    # may differ between the passes: rounding only)
    torch.testing.assert_close(ref_logp, got["standard"][1], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_divergences_other_than_the_forward_kl_take_the_standard_path(backend, monkeypatch):
    """The one-pass sums are E_p[kW] and E_ref[kW]: the reverse KL and the JSD recompute."""
    h0, w, _, y = make_head((2, 5), 24, 211, torch.float32, seed=1, scale=2.0)
    rh, rw, _, _ = make_head((2, 5), 24, 211, torch.float32, seed=4, scale=2.0)
    calls = _spy(monkeypatch, backend)
    for beta in (0.5, 1.0):
        h, = leaves(h0)
        div = fusedpref.linear_divergence(h, w, rh, rw, y, mix=beta, backend=backend)
        dh, = torch.autograd.grad(div.sum(), (h,))
        he, = leaves(h0)
        e_dh, = torch.autograd.grad(eager_divergence(he, w, rh, rw, y, beta=beta).sum(), (he,))
        ho, = as_float64(*leaves(h0))
        o_dh, = torch.autograd.grad(eager_divergence(ho, w.double(), rh.double(), rw.double(), y, beta=beta).sum(),
                                    (ho,))
        assert_within(f"dH beta={beta}", dh, e_dh, o_dh, torch.float32)
    assert not calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_frozen_student_with_its_own_transforms_against_a_capped_scaled_teacher(backend):
    """The forward KL with per-head transforms on the one-pass path (frozen student, mix 0): the
    student's cap and scale and the teacher's are applied to the right head."""
    h0, w, b, y = make_head((3, 9), 40, 1009, torch.float32, bias=True, seed=8, scale=3.0)
    rh, rw, rb, _ = make_head((3, 9), 32, 1009, torch.float32, bias=True, seed=9, scale=3.0)
    g = torch.randn(3, 9, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    opts = dict(softcap=4.0, ref_softcap=6.0, logit_scale=0.8, ref_logit_scale=1.3)
    h, = leaves(h0)
    div, _ = fusedpref.LinearDivergence.apply(h, w, rh, rw, y, b, rb, -100, backend, 0.0, opts["softcap"],
                                              opts["ref_softcap"], opts["logit_scale"], opts["ref_logit_scale"],
                                              frozen="one-pass")
    dh, = torch.autograd.grad(div, (h,), g)
    he, = leaves(h0)
    e = eager_divergence(he, w, rh, rw, y, beta=0.0, bias=b, ref_bias=rb, **opts)
    e_dh, = torch.autograd.grad(e, (he,), g)
    ho, = as_float64(*leaves(h0))
    wo, bo, rho, rwo, rbo = as_float64(w, b, rh, rw, rb)
    o = eager_divergence(ho, wo, rho, rwo, y, beta=0.0, bias=bo, ref_bias=rbo, **opts)
    o_dh, = torch.autograd.grad(o, (ho,), g.double())
    assert_within("divergence", div, e.detach(), o.detach(), torch.float32)
    assert_within("dH", dh, e_dh, o_dh, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_id_zero_on_the_one_pass_path(backend):
    """Vocabulary id 0 as a target (a third of the rows): its row's k(z_y) W[y] term is the first row's."""
    h0, w, b, y = make_head((4, 7), 24, 211, torch.float32, bias=True, seed=12, scale=2.0)
    y = torch.where(torch.arange(y.numel(), device=y.device).view(y.shape) % 3 == 0, torch.zeros_like(y), y)
    y[0, 1] = -100
    g = torch.randn(4, 7, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    h, = leaves(h0)
    lp = fusedpref.linear_logprobs(h, w, y, bias=b, softcap=3.0, backend=backend, frozen="one-pass")
    dh, = torch.autograd.grad(lp, (h,), g)
    he, = leaves(h0)
    e_dh, = torch.autograd.grad(eager_logprobs(he, w, y, b, softcap=3.0), (he,), g)
    ho, = as_float64(*leaves(h0))
    o_dh, = torch.autograd.grad(eager_logprobs(ho, w.double(), y, b.double(), softcap=3.0), (ho,), g.double())
    assert (y == 0).sum() >= 9
    assert_within("dH", dh, e_dh, o_dh, torch.float32)
