"""Reliability round 3: what a second week finds (each numbered as in the issue), with a test that
failed before the fix."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fusedpref
from helpers import DEVICE


def _batch(seed=0, v=97, d=24):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(4, 9, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.4
    y = torch.randint(0, v, (4, 9), generator=g)
    y[:, :3] = -100
    y[2:, 7:] = -100                 # the rejected rows shorter
    rh, rw = h + 0.2 * torch.randn(4, 9, d, generator=g), w + 0.05 * torch.randn(v, d, generator=g)
    return [t.to(DEVICE) for t in (h, w, y, rh, rw)]


# 6. inputs users pass ----------------------------------------------------------------------------

def test_6_numpy_floats_are_accepted_as_python_floats():
    h, w, y, rh, rw = _batch()
    ref = torch.randn(4, generator=torch.Generator().manual_seed(3)).to(DEVICE) - 20
    for loss_type, kw in (("sigmoid", dict(beta=0.2, label_smoothing=0.1)), ("simpo", dict(beta=2.0, gamma=0.7)),
                          ("cpo", dict(beta=0.5, alpha=0.3)), ("discopop", dict(beta=0.2, discopop_tau=0.1)),
                          (["sigmoid", "sft"], dict(beta=0.1, loss_weights=[0.7, 0.3]))):
        refs = {} if loss_type in ("simpo", "cpo") else dict(ref_logps=ref)
        want, _ = fusedpref.preference_loss(h, w, y, loss_type=loss_type, backend="torch", **refs, **kw)
        as_numpy = {k: ([np.float32(x) for x in v] if isinstance(v, list) else np.float32(v) if k != "beta"
                        else np.float64(v)) for k, v in kw.items()}
        got, _ = fusedpref.preference_loss(h, w, y, loss_type=loss_type, backend="torch", **refs, **as_numpy)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    labels = torch.tensor([True, False, True, False], device=DEVICE)
    want, _ = fusedpref.kto_loss(h, w, y, labels, beta=0.3, ref_logps=ref, desirable_weight=1.2, backend="torch")
    got, _ = fusedpref.kto_loss(h, w, y, labels, beta=np.float32(0.3), ref_logps=ref,
                                desirable_weight=np.float64(1.2), backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_6_expo_at_lambda_zero_is_the_pure_bradley_terry_loss(backend):
    """beta = lambda = 0 (the papers' limit, which DPOConfig accepts): softplus(-(c - r)), no KL term."""
    h, w, y, rh, rw = _batch()
    loss, metrics = fusedpref.preference_loss(h, w, y, loss_type="expo", beta=0.0, ref_hidden=rh, ref_weight=rw,
                                              backend=backend)
    lp = fusedpref.linear_logprobs(h, w, y, backend=backend).sum(-1)
    torch.testing.assert_close(loss, F.softplus(-(lp[:2] - lp[2:])).mean(), rtol=1e-6, atol=1e-6)
    assert metrics["kl/chosen"] > 0                       # the KL is still measured and logged
    with pytest.raises(ValueError, match=r"beta must be a positive finite float.*allowed for expo/typo alone"):
        fusedpref.preference_loss(h, w, y, loss_type="sigmoid", beta=0.0, ref_hidden=rh, ref_weight=rw)


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_6_torch_func_transforms_get_fusedprefs_message(transform):
    h, w, y, rh, rw = _batch()

    def f(hh):
        return fusedpref.linear_logprobs(hh, w, y[0], backend="torch").sum()
    fn = torch.func.vmap(f) if transform == "vmap" else torch.func.grad(f)
    with pytest.raises(RuntimeError, match="do not run under torch.func transforms"):
        fn(h if transform == "vmap" else h[0])


# 3. the first call does not import the compiler stack --------------------------------------------

@pytest.mark.slow      # a fresh interpreter
def test_3_eager_use_does_not_import_dynamo_inductor_or_sympy():
    code = """
import sys, time, torch, fusedpref
h = torch.randn(2, 6, 8, requires_grad=True); w = torch.randn(11, 8, requires_grad=True)
y = torch.randint(0, 11, (2, 6)); y[:, :2] = -100
fusedpref.linear_logprobs(h, w, y).sum().backward()
fusedpref.linear_logprobs_kl(h, w, h.detach(), w.detach(), y)[2].sum().backward()
loss, _ = fusedpref.preference_loss(h, w, y, loss_type="expo", ref_hidden=h.detach(), ref_weight=w.detach())
loss.backward()
print(sorted(m for m in ("torch._dynamo", "torch._inductor", "sympy") if m in sys.modules))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
