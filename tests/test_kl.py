"""linear_kl against the float64 eager oracle, both backends (interpreter on CPU)."""
import pytest
import torch

import fusedpref
from helpers import DEVICE, assert_within
from fusedpref.reference import as_float64, eager_kl, eager_logprobs, eager_token_stats
from helpers import leaves, make_head

pytestmark = pytest.mark.usefixtures("chunking")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["nocap", "cap"])
def test_kl_matches_oracle(backend, dtype, bias, softcap):
    h0, w0, b0, y = make_head((3, 13), 72, 1009, dtype, bias=bias, seed=2)
    # the reference head: another hidden size (40) and fp32, same vocabulary
    rh, rw, rb, _ = make_head((3, 13), 40, 1009, torch.float32, bias=bias, seed=5)
    g = torch.randn(3, 13, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    args = dict(softcap=softcap)

    h, w, b = leaves(h0, w0, b0)
    fused = fusedpref.linear_kl(h, w, rh, rw, y, bias=b, ref_bias=rb, backend=backend, **args)
    need = [t for t in (h, w, b) if t is not None]
    f_grads = torch.autograd.grad(fused, need, g)

    he, we, be = leaves(h0, w0, b0)
    eager = eager_kl(he, we, rh, rw, y, be, rb, **args)
    e_grads = torch.autograd.grad(eager, [t for t in (he, we, be) if t is not None], g)

    ho, wo, bo = as_float64(*leaves(h0, w0, b0))
    oracle = eager_kl(ho, wo, rh.double(), rw.double(), y, bo, None if rb is None else rb.double(), **args)
    o_grads = torch.autograd.grad(oracle, [t for t in (ho, wo, bo) if t is not None], g.double())

    assert (fused[y == -100] == 0).all() and (oracle[y != -100] > 0).all()
    assert_within("kl", fused, eager, oracle, dtype)
    for name, f, e, o in zip(["dH", "dW", "db"], f_grads, e_grads, o_grads):
        assert f.dtype == dtype
        assert_within(name, f, e, o, dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kl_of_identical_heads_is_zero_and_ref_gets_no_grad(backend):
    h, w, _, y = make_head((2, 7), 16, 130, torch.float32, seed=1)
    rh, rw = h.clone().requires_grad_(), w.clone().requires_grad_()
    hp, wp = leaves(h, w)
    kl = fusedpref.linear_kl(hp, wp, rh, rw, y, backend=backend)
    assert kl.abs().max() < 1e-5
    kl.sum().backward()
    assert rh.grad is None and rw.grad is None
    assert hp.grad.abs().max() < 1e-5  # p_theta == p_ref: zero gradient


def test_kl_errors():
    h, w, _, y = make_head((2, 7), 16, 130, torch.float32, seed=1)
    with pytest.raises(ValueError, match="share the vocabulary"):
        fusedpref.linear_kl(h, w, h, w[:100], y)
    with pytest.raises(ValueError, match="ref_hidden leading dims"):
        fusedpref.linear_kl(h, w, h[:1], w, y)
    with pytest.raises(TypeError, match="ref_weight dtype"):
        fusedpref.linear_kl(h, w, h, w.half(), y)
    y2 = y.clone()
    y2[:] = -100
    assert (fusedpref.linear_kl(h, w, h + 1, w, y2) == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias,softcap", [(False, None), (True, 3.0)], ids=["plain", "bias-cap"])
def test_logprobs_kl_in_one_pass_matches_oracle(backend, dtype, bias, softcap):
    """linear_logprobs_kl = linear_logprobs + reference log-probs + linear_kl, with one backward
    for upstream gradients on both logp and kl."""
    h0, w0, b0, y = make_head((3, 13), 72, 1009, dtype, bias=bias, seed=2)
    rh, rw, rb, _ = make_head((3, 13), 40, 1009, torch.float32, bias=bias, seed=5)
    gen = torch.Generator().manual_seed(3)
    g_lp, g_kl = (torch.randn(3, 13, generator=gen).to(DEVICE) for _ in range(2))

    h, w, b = leaves(h0, w0, b0)
    logp, ref_logp, kl, stats = fusedpref.LinearLogProbsKL.apply(h, w, rh, rw, y, b, rb, -100, softcap, backend, True)
    need = [t for t in (h, w, b) if t is not None]
    f_grads = torch.autograd.grad((logp, kl), need, (g_lp, g_kl))

    def eager_all(h, w, b, rh, rw, rb):
        return (eager_logprobs(h, w, y, b, softcap=softcap), eager_logprobs(rh, rw, y, rb, softcap=softcap),
                eager_kl(h, w, rh, rw, y, b, rb, softcap=softcap), eager_token_stats(h, w, y, b, softcap=softcap))

    he, we, be = leaves(h0, w0, b0)
    e = eager_all(he, we, be, rh, rw, rb)
    e_grads = torch.autograd.grad((e[0], e[2]), [t for t in (he, we, be) if t is not None], (g_lp, g_kl))
    ho, wo, bo = as_float64(*leaves(h0, w0, b0))
    o = eager_all(ho, wo, bo, rh.double(), rw.double(), None if rb is None else rb.double())
    o_grads = torch.autograd.grad((o[0], o[2]), [t for t in (ho, wo, bo) if t is not None],
                                  (g_lp.double(), g_kl.double()))

    assert not ref_logp.requires_grad and stats.shape == (3, 13, 4)
    for name, f, ee, oo in zip(["logp", "ref_logp", "kl"], (logp, ref_logp, kl), e, o):
        assert f.dtype == torch.float32 and (f[y == -100] == 0).all()
        assert_within(name, f, ee, oo, dtype)
    assert_within("logit_sum", stats[..., 0], e[3][..., 0], o[3][..., 0], dtype, atol=1e-3)
    assert_within("entropy", stats[..., 1], e[3][..., 1], o[3][..., 1], dtype)
    assert_within("log_sum_sq_probs", stats[..., 3], e[3][..., 3], o[3][..., 3], dtype)
    for name, f, ee, oo in zip(["dH", "dW", "db"], f_grads, e_grads, o_grads):
        assert f.dtype == dtype
        assert_within(name, f, ee, oo, dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logprobs_kl_equals_the_separate_primitives(backend):
    """Same values and gradients as the three separate calls it replaces (fp32, to rounding)."""
    h0, w0, _, y = make_head((2, 9), 24, 300, torch.float32, seed=7)
    rh, rw, _, _ = make_head((2, 9), 24, 300, torch.float32, seed=8)
    h, w = leaves(h0, w0)
    logp, ref_logp, kl = fusedpref.linear_logprobs_kl(h, w, rh, rw, y, backend=backend)
    (logp.sum() + 0.3 * kl.sum()).backward()
    h2, w2 = leaves(h0, w0)
    logp2 = fusedpref.linear_logprobs(h2, w2, y, backend=backend)
    kl2 = fusedpref.linear_kl(h2, w2, rh, rw, y, backend=backend)
    (logp2.sum() + 0.3 * kl2.sum()).backward()
    ref2 = fusedpref.linear_logprobs(rh, rw, y, backend=backend)
    for a, b in ((logp, logp2), (ref_logp, ref2), (kl, kl2), (h.grad, h2.grad), (w.grad, w2.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # only the KL used: logp's gradient is taken as zero
    h3, w3 = leaves(h0, w0)
    fusedpref.linear_logprobs_kl(h3, w3, rh, rw, y, backend=backend)[2].sum().backward()
    h4, w4 = leaves(h0, w0)
    fusedpref.linear_kl(h4, w4, rh, rw, y, backend=backend).sum().backward()
    torch.testing.assert_close(h3.grad, h4.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w3.grad, w4.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_ignore_index_and_int32_targets(backend):
    h, w, _, y = make_head((2, 9), 24, 300, torch.float32, seed=7)
    rh, rw, _, _ = make_head((2, 9), 24, 300, torch.float32, seed=8)
    y7 = torch.where(y == -100, torch.full_like(y, 7), y).to(torch.int32)   # 7 is also a vocabulary id
    a = fusedpref.linear_kl(h, w, rh, rw, y7, ignore_index=7, backend=backend)
    b = fusedpref.linear_kl(h, w, rh, rw, y, backend=backend)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    lp, rlp, kl = fusedpref.linear_logprobs_kl(h, w, rh, rw, y7, ignore_index=7, backend=backend)
    lp2, rlp2, kl2 = fusedpref.linear_logprobs_kl(h, w, rh, rw, y, backend=backend)
    for x, z in ((lp, lp2), (rlp, rlp2), (kl, kl2)):
        torch.testing.assert_close(x, z, rtol=0, atol=0)
    assert (lp[y7 == 7] == 0).all() and (kl[y7 == 7] == 0).all()
