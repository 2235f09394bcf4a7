"""linear_kl against the float64 eager oracle, both backends (interpreter on CPU)."""
import pytest
import torch

import fusedpref
from conftest import DEVICE, assert_within
from fusedpref.reference import as_float64, eager_kl
from helpers import leaves, make_head


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
