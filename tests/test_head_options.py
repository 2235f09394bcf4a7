"""The per-token head's options and the divergence primitive, against the float64 oracle
(fusedpref.reference), both backends (Triton in the interpreter on the CPU), one and many
vocabulary chunks:

- the statistics' gradients (entropy dH/dz = -p (log p + H), log sum p^2, sum of logits) served
  by the same backward recompute as the log-probs' gradient;
- a logit scale after the soft-cap (TRL's temperature and logit_scale);
- the divergences between two heads: KL(ref || policy) (beta 0), KL(policy || ref) (beta 1) and
  the generalised JSD (0 < beta < 1), with per-head caps and scales, different hidden sizes, the
  policy's statistics, gradients to the policy only.
"""
import pytest
import torch
from helpers import DEVICE, assert_within
from helpers import leaves, make_head

import fusedpref
from fusedpref.reference import as_float64, eager_divergence, eager_logprobs, eager_token_stats

pytestmark = pytest.mark.usefixtures("chunking")

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16]
# (softcap, logit_scale): TRL's softcap(s * y) / T is softcap_{c/s}(y) * s / T
TRANSFORMS = {"plain": (None, None), "temperature": (None, 1 / 0.7), "cap+temperature": (30.0 / 1.3, 1.3 / 0.7),
              "cap+negative-scale": (4.0, -0.5)}


def _grads(outputs, upstream, inputs):
    return torch.autograd.grad(outputs, [t for t in inputs if t is not None], upstream)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_logprobs_and_statistics_with_their_gradients(backend, dtype, transform):
    softcap, scale = TRANSFORMS[transform]
    h0, w0, b0, y = make_head((3, 9), 48, 1009, dtype, bias=True, seed=7, scale=3.0)
    gen = torch.Generator().manual_seed(8)
    g_lp = torch.randn(3, 9, generator=gen).to(DEVICE)
    g_st = torch.randn(3, 9, 4, generator=gen).to(DEVICE)

    h, w, b = leaves(h0, w0, b0)
    logp, stats = fusedpref.LinearLogProbs.apply(h, w, y, b, -100, softcap, backend, True, scale)
    got = _grads((logp, stats), (g_lp, g_st), (h, w, b))

    def eager(h, w, b):
        return (eager_logprobs(h, w, y, b, softcap=softcap, logit_scale=scale),
                eager_token_stats(h, w, y, b, softcap=softcap, logit_scale=scale))

    he, we, be = leaves(h0, w0, b0)
    e = eager(he, we, be)
    e_grads = _grads(e, (g_lp, g_st), (he, we, be))
    ho, wo, bo = as_float64(*leaves(h0, w0, b0))
    o = eager(ho, wo, bo)
    o_grads = _grads(o, (g_lp.double(), g_st.double()), (ho, wo, bo))

    assert_within("logp", logp, e[0], o[0], dtype)
    for col, name in ((0, "logit_sum"), (1, "entropy"), (3, "log_sum_sq_probs")):
        assert_within(name, stats[..., col], e[1][..., col], o[1][..., col], dtype, atol=1e-3 if col == 0 else None)
    for name, f, ee, oo in zip(["dH", "dW", "db"], got, e_grads, o_grads):
        assert f.dtype == dtype
        assert_within(name, f, ee, oo, dtype)
    assert (got[0][y == -100] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_entropy_differentiated(backend):
    """An entropy bonus alone (no log-prob gradient): dz = -g_H p (log p + H), as TRL's GRPO."""
    h0, w0, _, y = make_head((2, 7), 32, 211, torch.float32, seed=3, scale=2.0)
    h, w = leaves(h0, w0)
    _, stats = fusedpref.LinearLogProbs.apply(h, w, y, None, -100, None, backend, True)
    got = torch.autograd.grad(stats[..., 1].sum(), (h, w))
    he, we = leaves(h0, w0)
    eager = torch.autograd.grad(eager_token_stats(he, we, y)[..., 1].sum(), (he, we))
    ho, wo = as_float64(*leaves(h0, w0))
    want = torch.autograd.grad(eager_token_stats(ho, wo, y)[..., 1].sum(), (ho, wo))
    for name, a, e, o in zip(("dH", "dW"), got, eager, want):
        assert_within(name, a, e, o, torch.float32)


def test_gradcheck_float64_statistics_and_scale():
    h0, w0, b0, y = make_head((5,), 6, 37, torch.float64, bias=True, seed=4)
    h, w, b = leaves(h0, w0, b0)

    def f(h, w, b):
        logp, stats = fusedpref.LinearLogProbs.apply(h, w, y, b, -100, 3.0, "torch", True, 0.8)
        return logp, stats[..., 0], stats[..., 1], stats[..., 3]

    assert torch.autograd.gradcheck(f, (h, w, b), fast_mode=True)


# ---------------------------------------------------------------- divergences

BETAS = {"forward-kl": 0.0, "jsd": 0.5, "reverse-kl": 1.0, "jsd-0.1": 0.1}


def _two_heads(dtype, bias, seed=2):
    h, w, b, y = make_head((3, 11), 48, 1009, dtype, bias=bias, seed=seed, scale=3.0)
    rh, rw, rb, _ = make_head((3, 11), 40, 1009, torch.float32, bias=bias, seed=seed + 10, scale=3.0)
    return h, w, b, rh, rw, rb, y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", list(BETAS))
@pytest.mark.parametrize("heads", ["plain", "caps-scales-bias"])
def test_divergence_matches_oracle(backend, dtype, beta, heads):
    beta = BETAS[beta]
    bias = heads != "plain"
    h0, w0, b0, rh, rw, rb, y = _two_heads(dtype, bias)
    rh, rw = rh.to(dtype), rw.to(dtype)
    rb = None if rb is None else rb.to(dtype)
    opts = dict(softcap=8.0, ref_softcap=5.0, logit_scale=1 / 0.7, ref_logit_scale=0.9) if bias else {}
    gen = torch.Generator().manual_seed(5)
    g_div = torch.randn(3, 11, generator=gen).to(DEVICE)
    g_st = torch.randn(3, 11, 4, generator=gen).to(DEVICE)

    h, w, b = leaves(h0, w0, b0)
    div, stats = fusedpref.LinearDivergence.apply(
        h, w, rh, rw, y, b, rb, -100, backend, beta, opts.get("softcap"), opts.get("ref_softcap"),
        opts.get("logit_scale"), opts.get("ref_logit_scale"), True)
    got = _grads((div, stats), (g_div, g_st), (h, w, b))

    def eager(h, w, b, rh, rw, rb):
        return (eager_divergence(h, w, rh, rw, y, beta=beta, bias=b, ref_bias=rb, **opts),
                eager_token_stats(h, w, y, b, softcap=opts.get("softcap"), logit_scale=opts.get("logit_scale")))

    he, we, be = leaves(h0, w0, b0)
    e = eager(he, we, be, rh, rw, rb)
    e_grads = _grads(e, (g_div, g_st), (he, we, be))
    ho, wo, bo = as_float64(*leaves(h0, w0, b0))
    o = eager(ho, wo, bo, *as_float64(rh, rw, rb))
    o_grads = _grads(o, (g_div.double(), g_st.double()), (ho, wo, bo))

    assert (div[y == -100] == 0).all() and (div[y != -100] >= -1e-4).all()
    assert_within("divergence", div, e[0], o[0], dtype)
    assert_within("entropy", stats[..., 1], e[1][..., 1], o[1][..., 1], dtype)
    for name, f, ee, oo in zip(["dH", "dW", "db"], got, e_grads, o_grads):
        assert f.dtype == dtype
        assert_within(name, f, ee, oo, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_beta_zero_is_linear_kl(backend):
    """beta = 0 at temperature 1 is exactly linear_kl: one kernel family, the same numbers."""
    h0, w0, _, rh, rw, _, y = _two_heads(torch.float32, False)
    h1, w1 = leaves(h0, w0)
    kl = fusedpref.linear_kl(h1, w1, rh, rw, y, backend=backend)
    h2, w2 = leaves(h0, w0)
    div = fusedpref.linear_divergence(h2, w2, rh, rw, y, mix=0.0, backend=backend)
    assert torch.equal(kl, div)
    g = torch.randn_like(kl)
    for a, b in zip(torch.autograd.grad(kl, (h1, w1), g), torch.autograd.grad(div, (h2, w2), g)):
        assert torch.equal(a, b)


def test_gradcheck_float64_divergences():
    h0, w0, b0, rh, rw, rb, y = _two_heads(torch.float64, True)
    for beta in (0.0, 0.3, 1.0):
        h, w, b = leaves(h0[:1, :4], w0[:53], b0[:53])

        def f(h, w, b):
            div, stats = fusedpref.LinearDivergence.apply(h, w, rh[:1, :4], rw[:53], y[:1, :4].clamp(0, 52), b,
                                                          rb[:53], -100, "torch", beta, 6.0, 4.0, 1.1, 0.9, True)
            return div, stats[..., 1]

        assert torch.autograd.gradcheck(f, (h, w, b), fast_mode=True), beta


def test_temperature_in_the_functional_forms():
    """linear_logprobs / linear_divergence: logits softcap(y) * logit_scale / temperature."""
    h, w, _, rh, rw, _, y = _two_heads(torch.float64, False)
    lp = fusedpref.linear_logprobs(h, w, y, softcap=5.0, logit_scale=1.5, temperature=0.6)
    torch.testing.assert_close(lp, eager_logprobs(h, w, y, softcap=5.0, logit_scale=2.5))
    div = fusedpref.linear_divergence(h, w, rh.double(), rw.double(), y, mix=0.5, temperature=2.0)
    torch.testing.assert_close(div, eager_divergence(h, w, rh.double(), rw.double(), y, beta=0.5, logit_scale=0.5,
                                                     ref_logit_scale=0.5))
