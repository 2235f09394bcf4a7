"""KTO against a TRL-style float64 eager reference (full logits), both backends."""
import pytest
import torch

import fusedpref
from helpers import DEVICE, assert_within
from fusedpref.reference import eager_kto_loss

N, T, D, V = 5, 8, 16, 61


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, T, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.4
    y = torch.randint(0, V, (N, T), generator=g)
    y[:, :3] = -100
    y[1, 6:] = -100
    labels = torch.tensor([True, False, True, True, False])
    rh = h + 0.2 * torch.randn(N, T, D, generator=g)
    kl_h = torch.randn(N, T, D, generator=g)
    kl_rh = kl_h + 0.5 * torch.randn(N, T, D, generator=g)
    ky = y.roll(1, 0)
    return [t.to(DEVICE) for t in (h, w, y, labels, rh, kl_h, kl_rh, ky)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("opts", [{}, {"average_log_prob": True, "reduction": "none"},
                                  {"reduction": "sum", "ignore_index": 5}], ids=["default", "avg-none", "sum-ii5"])
def test_kto_matches_trl_reference(backend, opts):
    """Loss, every logged metric and the gradients against TRL's KTOTrainer formulas (float64)."""
    h0, w0, y, labels, rh, kl_h, kl_rh, ky = _data()
    ii = opts.get("ignore_index", -100)
    if ii != -100:
        y, ky = (torch.where(t == -100, torch.full_like(t, ii), t) for t in (y, ky))
    out = {}
    for name, dtype in (("fused", torch.float32), ("eager", torch.float32), ("oracle", torch.float64)):
        h, w = (t.detach().to(dtype).requires_grad_() for t in (h0, w0))
        args = dict(beta=0.3, ref_hidden=rh.to(dtype), ref_weight=w, kl_hidden=kl_h.to(dtype), kl_targets=ky,
                    ref_kl_hidden=kl_rh.to(dtype), desirable_weight=1.2, undesirable_weight=0.8, **opts)
        if name == "fused":
            loss, m = fusedpref.kto_loss(h, w, y, labels, backend=backend, **args)
        else:
            loss, m = eager_kto_loss(h, w, y, labels, **args)
        g = torch.linspace(0.5, 1.5, loss.numel(), dtype=dtype, device=DEVICE).view(loss.shape)
        out[name] = (loss, m, *torch.autograd.grad(loss, (h, w), g))
    assert out["oracle"][1]["kl"] > 0  # the KL estimate is active in this test
    assert set(out["fused"][1]) == set(out["oracle"][1])
    for key, o in out["oracle"][1].items():
        assert_within(key, out["fused"][1][key], out["eager"][1][key], o, torch.float32)
    for i, name in [(0, "loss"), (2, "dH"), (3, "dW")]:
        assert_within(name, out["fused"][i], out["eager"][i], out["oracle"][i], torch.float32)


def test_kto_precomputed_matches_fused_and_errors():
    h, w, y, labels, rh, kl_h, kl_rh, ky = _data(1)
    ref = fusedpref.reference_logps(rh, w, y, backend="torch")
    kl_p = fusedpref.reference_logps(kl_h, w, ky, backend="torch")
    kl_r = fusedpref.reference_logps(kl_rh, w, ky, backend="torch")
    a, _ = fusedpref.kto_loss(h, w, y, labels, ref_hidden=rh, ref_weight=w, kl_hidden=kl_h, kl_targets=ky,
                              ref_kl_hidden=kl_rh, backend="torch")
    b, _ = fusedpref.kto_loss(h, w, y, labels, ref_logps=ref, kl_logps=kl_p, ref_kl_logps=kl_r, backend="torch")
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="labels must be a bool"):
        fusedpref.kto_loss(h, w, y, labels.long(), ref_logps=ref, backend="torch")
    with pytest.raises(ValueError, match="needs a reference"):
        fusedpref.kto_loss(h, w, y, labels, backend="torch")
    with pytest.raises(ValueError, match="kl_logps and ref_kl_logps"):
        fusedpref.kto_loss(h, w, y, labels, ref_logps=ref, kl_logps=kl_p, backend="torch")
