"""The grouped program order (kernels/schedule.py grouped) over several bands and a partial last band,
in every kernel that uses it: logprob_dz and kl_dz (backward), mm_acc (dH += dz W and the frozen
path's ROW_SCALE accumulation), chunk_logits (the frozen path). At the main shape these kernels run
thousands of row blocks; here 300 rows are 19 of the interpreter's 16-row blocks, so GROUP_M = 8
gives bands of 8, 8 and 3 row blocks, each sweeping 3 vocabulary tiles (V = 130) or, for mm_acc, 2
hidden tiles (D = 72). Triton in the interpreter against the float64 oracle, the suite's rule."""
import pytest
import torch

import fusedpref
from fusedpref import schedule
from fusedpref.reference import as_float64, eager_kl, eager_logprobs
from helpers import DEVICE, assert_within, leaves, make_head

N, D, V = 300, 72, 130


def test_the_shapes_span_several_bands_and_a_partial_last_one():
    blocks = -(-N // 16)
    assert schedule.GROUP_M == 8 and blocks == 19 and blocks % schedule.GROUP_M == 3


def _grads(out, inputs, g):
    need = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(out, need, g)


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_logprobs_over_several_bands(frozen):
    h0, w0, b0, y = make_head((N,), D, V, torch.float32, bias=True, seed=4, scale=2.0)
    g = torch.randn(N, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    results = []
    for kind in ("fused", "eager", "oracle"):
        h, w, b = leaves(h0, w0, b0)
        if frozen:
            w, b = w.detach(), b.detach()
        if kind == "oracle":
            h, w, b = as_float64(h, w, b)
        out = fusedpref.linear_logprobs(h, w, y, bias=b, backend="triton") if kind == "fused" else \
            eager_logprobs(h, w, y, b)
        results.append((out, _grads(out, (h, w, b), g.to(out.dtype))))
    (f, fg), (e, eg), (o, og) = results
    assert_within("logp", f, e.detach(), o.detach(), torch.float32)
    for name, a, b_, c in zip(("dH", "dW", "db"), fg, eg, og):
        assert_within(name, a, b_, c, torch.float32)
    assert len(fg) == (1 if frozen else 3)


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_logprobs_and_kl_over_several_bands(frozen):
    h0, w0, b0, y = make_head((N,), D, V, torch.float32, bias=True, seed=5, scale=2.0)
    rh, rw, rb, _ = make_head((N,), 40, V, torch.float32, bias=True, seed=6, scale=2.0)
    gen = torch.Generator().manual_seed(2)
    g_lp, g_kl = (torch.randn(N, generator=gen).to(DEVICE) for _ in range(2))
    results = []
    for kind in ("fused", "eager", "oracle"):
        h, w, b = leaves(h0, w0, b0)
        if frozen:
            w, b = w.detach(), b.detach()
        refs = (rh, rw, rb)
        if kind == "oracle":
            h, w, b = as_float64(h, w, b)
            refs = as_float64(*refs)
        if kind == "fused":
            lp, _, kl = fusedpref.linear_logprobs_kl(h, w, *refs[:2], y, bias=b, ref_bias=refs[2], backend="triton")
        else:
            lp, kl = eager_logprobs(h, w, y, b), eager_kl(h, w, refs[0], refs[1], y, b, refs[2])
        need = [t for t in (h, w, b) if t.requires_grad]
        results.append(((lp, kl), torch.autograd.grad((lp, kl), need, (g_lp.to(lp.dtype), g_kl.to(kl.dtype)))))
    (f, fg), (e, eg), (o, og) = results
    for name, a, b_, c in zip(("logp", "kl"), f, e, o):
        assert_within(name, a, b_.detach(), c.detach(), torch.float32)
    for name, a, b_, c in zip(("dH", "dW", "db"), fg, eg, og):
        assert_within(name, a, b_, c, torch.float32)
