"""linear_logprobs against the float64 eager oracle, both backends (interpreter on CPU)."""
import pytest
import torch

import fusedpref
from helpers import DEVICE, assert_within
from fusedpref.reference import as_float64, eager_logprobs, eager_token_stats
from helpers import leaves, make_head

pytestmark = pytest.mark.usefixtures("chunking")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(37,), (3, 19)]


def _grads(out, inputs, g):
    need = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(out, need, g))
    return [None if t is None else next(got) for t in inputs]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["nocap", "cap"])
def test_forward_backward_matches_oracle(backend, dtype, n_shape, bias, softcap):
    h0, w0, b0, y = make_head(n_shape, 72, 1009, dtype, bias=bias, seed=len(n_shape) + 7 * bias)
    g = torch.randn(n_shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    h, w, b = leaves(h0, w0, b0)
    fused = fusedpref.linear_logprobs(h, w, y, bias=b, softcap=softcap, backend=backend)
    f_grads = _grads(fused, [h, w, b], g)

    he, we, be = leaves(h0, w0, b0)
    eager = eager_logprobs(he, we, y, be, softcap=softcap)
    e_grads = _grads(eager, [he, we, be], g)

    ho, wo, bo = as_float64(*leaves(h0, w0, b0))
    oracle = eager_logprobs(ho, wo, y, bo, softcap=softcap)
    o_grads = _grads(oracle, [ho, wo, bo], g.double())

    assert fused.dtype == torch.float32 and fused.shape == y.shape
    assert (fused[y == -100] == 0).all()
    assert_within("logp", fused, eager, oracle, dtype)
    for name, f, e, o in zip(["dH", "dW", "db"], f_grads, e_grads, o_grads):
        if o is None:
            continue
        assert f.dtype == dtype, (name, f.dtype)
        assert_within(name, f, e, o, dtype)
    # rows whose target is ignored get exactly zero hidden gradient
    assert (f_grads[0][y == -100] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softcap", [None, 2.5], ids=["nocap", "cap"])
def test_token_stats_match_oracle(backend, dtype, softcap):
    # logits up to ~20 without the cap: the entropy must not lose digits to lse - E_p[z]
    h, w, b, y = make_head((4, 11), 40, 1009, dtype, bias=True, seed=3)
    # force some exact argmax hits: make the target the largest logit on a few rows
    y[0, :5] = torch.argmax((h[0, :5].double() @ w.double().t()) + b.double(), dim=-1)
    _, stats = fusedpref.LinearLogProbs.apply(h, w, y, b, -100, softcap, backend, True)
    oracle = eager_token_stats(*as_float64(h, w), y, b.double(), softcap=softcap)
    eager = eager_token_stats(h, w, y, b, softcap=softcap)
    assert stats.shape == (4, 11, 4)
    assert_within("logit_sum", stats[..., 0], eager[..., 0], oracle[..., 0], dtype, atol=1e-3)
    assert_within("entropy", stats[..., 1], eager[..., 1], oracle[..., 1], dtype)
    assert_within("log_sum_sq_probs", stats[..., 3], eager[..., 3], oracle[..., 3], dtype)
    assert torch.equal(stats[..., 2], oracle[..., 2].float()), "argmax hits differ"
    assert stats[0, :5, 2].sum() >= 4  # the forced hits are seen (bf16 may tie one)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_head_and_no_grad(backend):
    h0, w0, _, y = make_head((2, 9), 24, 130, torch.float32, seed=5)
    h = h0.clone().requires_grad_()
    out = fusedpref.linear_logprobs(h, w0, y, backend=backend)   # weight frozen (LoRA case)
    out.sum().backward()
    assert w0.grad is None and h.grad is not None and torch.isfinite(h.grad).all()
    with torch.no_grad():
        ref = fusedpref.linear_logprobs(h, w0.requires_grad_(), y, backend=backend)
    assert ref.grad_fn is None
    torch.testing.assert_close(ref, out.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backends_agree_and_noncontiguous(backend):
    h0, w0, b0, y = make_head((5, 8), 48, 257, torch.float32, bias=True, seed=11)
    # non-contiguous views of the same values
    hn = h0.transpose(0, 1).contiguous().transpose(0, 1)
    wn = w0.t().contiguous().t()
    yn = y.t().contiguous().t()
    assert not hn.is_contiguous() and not wn.is_contiguous() and not yn.is_contiguous()
    a = fusedpref.linear_logprobs(hn, wn, yn, bias=b0, backend=backend)
    b = eager_logprobs(*as_float64(h0, w0), y, b0.double())
    torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-5)
    h, w = leaves(hn, wn)
    fusedpref.linear_logprobs(h, w, yn, backend=backend).sum().backward()
    ho, wo = as_float64(*leaves(h0, w0))
    eager_logprobs(ho, wo, y).sum().backward()
    torch.testing.assert_close(h.grad.double(), ho.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), wo.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("v", [1, 5, 17])
def test_vocab_smaller_than_a_tile(backend, v):
    h0, w0, _, y = make_head((6,), 10, v, torch.float32, ignore_frac=0.0, seed=v)
    h, w = leaves(h0, w0)
    out = fusedpref.linear_logprobs(h, w, y, backend=backend)
    g = torch.randn(6).to(DEVICE)
    out.backward(g)
    ho, wo = as_float64(*leaves(h0, w0))
    ref = eager_logprobs(ho, wo, y)
    ref.backward(g.double())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), ho.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), wo.grad, rtol=0, atol=1e-5)
    if v == 1:
        assert (out == 0).all()  # a one-word vocabulary has log-probability 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_and_all_ignored(backend):
    for shape in [(0,), (2, 0), (3, 4)]:
        h0, w0, b0, y = make_head(shape, 16, 50, torch.float32, bias=True, seed=2)
        y.fill_(-100)
        h, w, b = leaves(h0, w0, b0)
        out = fusedpref.linear_logprobs(h, w, y, bias=b, backend=backend)
        assert out.shape == y.shape and (out == 0).all()
        out.sum().backward()
        for t in (h, w, b):
            assert t.grad is not None and t.grad.shape == t.shape
            assert (t.grad == 0).all() and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_chunking_is_invisible(monkeypatch, backend):
    """Vocabulary chunks much smaller than V (boundaries inside tiles) give the numbers of one
    chunk: log-probs, every statistic (argmax ids are offset by the chunk start), dH, dW, db."""
    h0, w0, b0, y = make_head((40,), 32, 700, torch.float32, bias=True, seed=9)
    y[:6] = torch.argmax(h0[:6] @ w0.t() + b0, dim=-1)      # argmax hits in late chunks too
    results = []
    for cols in [None, "97"] + (["1"] if backend == "torch" else []):   # 1: 700 interpreter launches
        if cols is None:
            monkeypatch.delenv("FUSEDPREF_CHUNK_COLS", raising=False)
        else:
            monkeypatch.setenv("FUSEDPREF_CHUNK_COLS", cols)
        h, w, b = leaves(h0, w0, b0)
        out, stats = fusedpref.LinearLogProbs.apply(h, w, y, b, -100, 4.0, backend, True)
        out.backward(torch.linspace(-1, 1, 40, device=DEVICE))
        results.append([out, stats, h.grad, w.grad, b.grad])
    assert results[0][1][:6, 2].sum() >= 5
    for other in results[1:]:
        for name, a, b in zip(["logp", "stats", "dH", "dW", "db"], results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
