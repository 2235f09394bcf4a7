"""Timings of the primitives and the loss at a few sizes (forward+backward)."""
import pytest
import torch

import fusedpref
from conftest import BACKEND, DEVICE

SIZES = [(512, 256, 8000), (1024, 256, 32000)] if DEVICE == "cpu" else \
    [(4096, 4096, 32000), (8192, 4096, 128256)]
DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16


def _head(n, d, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(DTYPE).to(DEVICE).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d ** 0.5).to(DTYPE).to(DEVICE).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    return h, w, y


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("n,d,v", SIZES, ids=lambda x: str(x))
def test_linear_logprobs(benchmark, n, d, v):
    h, w, y = _head(n, d, v)

    def step():
        fusedpref.linear_logprobs(h, w, y, backend=BACKEND).sum().backward()
        _sync()
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert torch.isfinite(h.grad).all()


@pytest.mark.parametrize("n,d,v", SIZES, ids=lambda x: str(x))
def test_linear_kl(benchmark, n, d, v):
    h, w, y = _head(n, d, v)
    rh, rw, _ = _head(n, d, v, seed=1)

    def step():
        fusedpref.linear_kl(h, w, rh.detach(), rw.detach(), y, backend=BACKEND).sum().backward()
        _sync()
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert torch.isfinite(w.grad).all()


@pytest.mark.parametrize("loss_type", ["sigmoid", "expo"])
def test_preference_loss(benchmark, loss_type):
    n, d, v = SIZES[0]
    h, w, y = _head(n, d, v)
    h3, y3 = h.view(8, n // 8, d), y.view(8, n // 8)
    rh, rw, _ = _head(n, d, v, seed=2)

    def step():
        loss, _ = fusedpref.preference_loss(h3, w, y3, loss_type=loss_type, ref_hidden=rh.view_as(h3).detach(),
                                            ref_weight=rw.detach(), backend=BACKEND)
        loss.backward()
        _sync()
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert torch.isfinite(w.grad).all()


@pytest.mark.parametrize("impl", ["separate", "one-pass"])
def test_expo_per_token_work(benchmark, impl):
    """EXPO's per-token work (policy log-probs, reference log-probs, exact KL; backward through
    log-probs and KL): three primitives, as before linear_logprobs_kl, against the one pass."""
    n, d, v = SIZES[-1]
    h, w, y = _head(n, d, v)
    rh, rw, _ = _head(n, d, v, seed=2)
    rh, rw = rh.detach(), rw.detach()
    g = torch.Generator().manual_seed(3)
    g_lp, g_kl = torch.randn(n, generator=g).to(DEVICE), torch.randn(n, generator=g).to(DEVICE)

    def step():
        if impl == "separate":
            logp = fusedpref.linear_logprobs(h, w, y, backend=BACKEND)
            with torch.no_grad():
                fusedpref.linear_logprobs(rh, rw, y, backend=BACKEND)
            kl = fusedpref.linear_kl(h, w, rh, rw, y, backend=BACKEND)
        else:
            logp, _, kl = fusedpref.linear_logprobs_kl(h, w, rh, rw, y, backend=BACKEND)
        torch.autograd.backward((logp, kl), (g_lp, g_kl))
        _sync()
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert torch.isfinite(w.grad).all()
