"""KTO against a TRL-style float64 eager reference (full logits), both backends."""
import pytest
import torch

import fusedpref
from conftest import DEVICE, assert_within
from trl_reference import _batch_logps

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


def _trl_kto(h, w, y, labels, rh, kl_h, kl_rh, ky, beta, wd, wu):
    logps, _, _ = _batch_logps(h, w, None, y, -100, None)
    with torch.no_grad():
        ref, _, _ = _batch_logps(rh, w, None, y, -100, None)
        kl_pol, _, _ = _batch_logps(kl_h, w, None, ky, -100, None)
        kl_ref, _, _ = _batch_logps(kl_rh, w, None, ky, -100, None)
        kl = (kl_pol - kl_ref).mean().clamp(min=0)
    ch, rj = logps[labels] - ref[labels], logps[~labels] - ref[~labels]
    losses = torch.cat([wd * (1 - torch.sigmoid(beta * (ch - kl))), wu * (1 - torch.sigmoid(beta * (kl - rj)))])
    return losses.nanmean(), kl


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kto_matches_trl_reference(backend):
    h0, w0, y, labels, rh, kl_h, kl_rh, ky = _data()
    out = {}
    for name, dtype in (("fused", torch.float32), ("eager", torch.float32), ("oracle", torch.float64)):
        h, w = (t.detach().to(dtype).requires_grad_() for t in (h0, w0))
        args = [t.to(dtype) for t in (rh, kl_h, kl_rh)]
        if name == "fused":
            loss, m = fusedpref.kto_loss(h, w, y, labels, beta=0.3, ref_hidden=args[0], ref_weight=w,
                                         kl_hidden=args[1], kl_targets=ky, ref_kl_hidden=args[2],
                                         desirable_weight=1.2, undesirable_weight=0.8, backend=backend)
            kl = m["kl"]
        else:
            loss, kl = _trl_kto(h, w, y, labels, args[0], args[1], args[2], ky, 0.3, 1.2, 0.8)
        out[name] = (loss, kl, *torch.autograd.grad(loss, (h, w)))
    assert out["oracle"][1] > 0  # the KL estimate is active in this test
    for i, name in enumerate(["loss", "kl", "dH", "dW"]):
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
