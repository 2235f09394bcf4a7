"""Property-based tests (hypothesis): random shapes (N 0 to a few hundred, odd D and V from tiny
to moderate), ignore fractions 0-100%, leading dims, dtypes, bias and soft-cap, random upstream
gradients; both backends against the float64 oracle under the suite's rule. Derandomized and
bounded (the interpreter runs the Triton kernels on the CPU), so CI sees the same examples."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedpref
from helpers import DEVICE, assert_within
from fusedpref.losses import LOSSES
from fusedpref.reference import as_float64, eager_kl, eager_kto_loss, eager_logprobs, eager_preference_loss

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
BACKEND_EXAMPLES = {"torch": 25, "triton": 10}


@st.composite
def heads(draw, max_rows):
    shape = draw(st.one_of(st.tuples(st.integers(0, max_rows)),
                           st.tuples(st.integers(1, 6), st.integers(0, max_rows // 6))))
    d = draw(st.integers(1, 20)) * 2 - 1            # odd hidden sizes 1..39
    v = draw(st.integers(1, 150)) * 2 - 1           # odd vocabularies 1..299
    return dict(shape=shape, d=d, v=v, ignore=draw(st.sampled_from([0.0, 0.3, 0.8, 1.0])),
                bias=draw(st.booleans()), softcap=draw(st.sampled_from([None, 2.0, 7.5])),
                seed=draw(st.integers(0, 2**16)))


def _make(p, dtype, d=None):
    g = torch.Generator().manual_seed(p["seed"])
    d = d or p["d"]
    h = torch.randn(*p["shape"], d, generator=g)
    w = torch.randn(p["v"], d, generator=g) * (2 / d ** 0.5)
    b = torch.randn(p["v"], generator=g) * 0.5 if p["bias"] else None
    y = torch.randint(0, p["v"], p["shape"], generator=g)
    y[torch.rand(p["shape"], generator=g) < p["ignore"]] = -100
    gr = torch.randn(p["shape"], generator=g)
    cast = lambda t: None if t is None else t.to(dtype).to(DEVICE)  # noqa: E731
    return cast(h), cast(w), cast(b), y.to(DEVICE), gr.to(DEVICE)


def _check(name, fn, oracle_fn, tensors, grad, dtype):
    """fn and oracle_fn map (h, w, b) to one per-token tensor; values and gradients checked."""
    outs = {}
    for kind, cast in (("fused", lambda t: t), ("eager", lambda t: t), ("oracle", lambda t: t.double())):
        leaves = [None if t is None else cast(t).detach().requires_grad_() for t in tensors]
        out = (fn if kind == "fused" else oracle_fn)(*leaves)
        need = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(out, need, grad.to(out.dtype), allow_unused=True) if out.numel() else [
            torch.zeros_like(t) for t in need]
        outs[kind] = (out, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, need)])
    assert_within(name, *(outs[k][0] for k in ("fused", "eager", "oracle")), dtype)
    for i, (f, e, o) in enumerate(zip(*(outs[k][1] for k in ("fused", "eager", "oracle")))):
        assert_within(f"{name} grad {i}", f, e, o, dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_logprobs_property(backend):
    @settings(max_examples=BACKEND_EXAMPLES[backend], **SETTINGS)
    @given(p=heads(max_rows=200 if backend == "torch" else 60),
           dtype=st.sampled_from([torch.float32, torch.bfloat16] if backend == "torch" else [torch.float32]))
    def run(p, dtype):
        h, w, b, y, gr = _make(p, dtype)
        _check("logp", lambda h, w, b: fusedpref.linear_logprobs(h, w, y, bias=b, softcap=p["softcap"],
                                                                 backend=backend),
               lambda h, w, b: eager_logprobs(h, w, y, b, softcap=p["softcap"]), (h, w, b), gr, dtype)
    run()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_kl_and_logprobs_kl_property(backend):
    @settings(max_examples=BACKEND_EXAMPLES[backend], **SETTINGS)
    @given(p=heads(max_rows=120 if backend == "torch" else 40), rd=st.integers(1, 12))
    def run(p, rd):
        h, w, b, y, gr = _make(p, torch.float32)
        rh, rw, _, _, _ = _make({**p, "seed": p["seed"] + 1}, torch.float32, d=rd)
        cap = p["softcap"]
        _check("kl", lambda h, w, b: fusedpref.linear_kl(h, w, rh, rw, y, bias=b, softcap=cap, backend=backend),
               lambda h, w, b: eager_kl(h, w, rh.to(h.dtype), rw.to(h.dtype), y, b, softcap=cap), (h, w, b), gr,
               torch.float32)

        def both(h, w, b):
            logp, _, kl = fusedpref.linear_logprobs_kl(h, w, rh, rw, y, bias=b, softcap=cap, backend=backend)
            return logp + 0.7 * kl

        def both_eager(h, w, b):
            return (eager_logprobs(h, w, y, b, softcap=cap)
                    + 0.7 * eager_kl(h, w, rh.to(h.dtype), rw.to(h.dtype), y, b, softcap=cap))
        _check("logp+kl", both, both_eager, (h, w, b), gr, torch.float32)
    run()


LOSS_NAMES = sorted(set(LOSSES) - {"typo"})


@st.composite
def batches(draw):
    return dict(b=draw(st.integers(1, 4)), t=draw(st.integers(1, 7)), d=draw(st.integers(1, 12)) * 2 - 1,
                v=draw(st.integers(2, 60)) * 2 - 1, loss_type=draw(st.sampled_from(LOSS_NAMES)),
                beta=draw(st.sampled_from([0.05, 0.5, 2.0])), seed=draw(st.integers(0, 2**16)),
                reduction=draw(st.sampled_from(["mean", "sum", "none"])))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_preference_loss_property(backend):
    @settings(max_examples=30 if backend == "torch" else 10, **SETTINGS)
    @given(p=batches())
    def run(p):
        g = torch.Generator().manual_seed(p["seed"])
        n, t, d, v = 2 * p["b"], p["t"], p["d"], p["v"]
        h0, w0 = torch.randn(n, t, d, generator=g), torch.randn(v, d, generator=g) * 0.5
        y = torch.randint(0, v, (n, t), generator=g)
        y[:, : t // 2] = -100                          # a prompt; every sequence keeps >= 1 token
        rh, rw = h0 + 0.2 * torch.randn(n, t, d, generator=g), w0 + 0.1 * torch.randn(v, d, generator=g)
        h0, w0, y, rh, rw = (x.to(DEVICE) for x in (h0, w0, y, rh, rw))
        kw = dict(loss_type=p["loss_type"], beta=p["beta"], reduction=p["reduction"],
                  label_smoothing=0.1 if p["loss_type"] in ("exo_pair", "robust") else 0.0)
        refs = dict(ref_hidden=rh, ref_weight=rw) if LOSSES[p["loss_type"]].needs_ref else {}
        res = {}
        for kind, dtype in (("fused", torch.float32), ("eager", torch.float32), ("oracle", torch.float64)):
            h, w = h0.to(dtype).requires_grad_(), w0.to(dtype).requires_grad_()
            r = {k: x.to(dtype) for k, x in refs.items()}
            fn = (lambda *a, **k: fusedpref.preference_loss(*a, backend=backend, **k)) if kind == "fused" \
                else eager_preference_loss
            loss, metrics = fn(h, w, y, **kw, **r)
            up = torch.linspace(0.5, 1.5, loss.numel(), dtype=dtype, device=DEVICE).view(loss.shape)
            res[kind] = (loss, metrics, torch.autograd.grad(loss, (h, w), up))
        assert_within("loss", res["fused"][0], res["eager"][0], res["oracle"][0], torch.float32)
        for key, o in res["oracle"][1].items():
            assert_within(key, res["fused"][1][key], res["eager"][1][key], o, torch.float32)
        for i, name in enumerate(("dH", "dW")):
            assert_within(name, res["fused"][2][i], res["eager"][2][i], res["oracle"][2][i], torch.float32)
    run()


@settings(max_examples=20, **SETTINGS)
@given(n=st.integers(1, 6), t=st.integers(1, 6), v=st.integers(2, 40), seed=st.integers(0, 2**16),
       avg=st.booleans(), frac=st.sampled_from([0.0, 0.5, 1.0]))
def test_kto_loss_property(n, t, v, seed, avg, frac):
    g = torch.Generator().manual_seed(seed)
    h0, w0 = torch.randn(n, t, 9, generator=g), torch.randn(v, 9, generator=g) * 0.5
    y = torch.randint(0, v, (n, t), generator=g)
    y[:, 0] = -100
    labels = torch.rand(n, generator=g) < frac
    rh = h0 + 0.3 * torch.randn(n, t, 9, generator=g)
    h0, w0, y, labels, rh = (x.to(DEVICE) for x in (h0, w0, y, labels, rh))
    res = {}
    for kind, dtype in (("fused", torch.float32), ("eager", torch.float32), ("oracle", torch.float64)):
        h, w = h0.to(dtype).requires_grad_(), w0.to(dtype).requires_grad_()
        kw = dict(beta=0.4, ref_hidden=rh.to(dtype), ref_weight=w0.to(dtype), average_log_prob=avg)
        fn = (lambda *a, **k: fusedpref.kto_loss(*a, backend="torch", **k)) if kind == "fused" else eager_kto_loss
        loss, metrics = fn(h, w, y, labels, **kw)
        res[kind] = (loss, metrics, torch.autograd.grad(loss, (h, w)))
    assert_within("loss", res["fused"][0], res["eager"][0], res["oracle"][0], torch.float32)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl"):
        o = res["oracle"][1][key]
        if torch.isnan(o):          # TRL's mean over no sequence of that kind; fusedpref logs 0
            assert res["fused"][1][key] == 0
            continue
        assert_within(key, res["fused"][1][key], res["eager"][1][key], o, torch.float32)
    for i, name in enumerate(("dH", "dW")):
        assert_within(name, res["fused"][2][i], res["eager"][2][i], res["oracle"][2][i], torch.float32)


def test_as_float64_keeps_requires_grad():
    a, b = as_float64(torch.zeros(2, requires_grad=True), torch.zeros(2))
    assert a.dtype == torch.float64 and a.requires_grad and not b.requires_grad
