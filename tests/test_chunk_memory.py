"""The torch backend's transient memory per call stays within its chunk budget (fusedpref/chunked.py):
every pass sizes its chunks so that the rows x chunk buffers it holds at once fit in
FUSEDPREF_CHUNK_MB (8 MiB on the CPU), plus a few N x D rows buffers (the compacted hidden states,
the dH accumulator, the scattered dH, a frozen head's directions), whatever V is. Counted by the
allocations aten ops make (helpers.PeakMemory), so the bound is exact and the same on every machine.
At the benchmark's CPU shape main at 1222b60 held 32.1 MiB (sigmoid), 48.6 MiB (EXPO), 40.1 MiB
(a soft-capped head) and 49.1 MiB (a frozen soft-capped head)."""
import pytest
import torch

import fusedpref
from helpers import PeakMemory

# fusedpref bench's CPU shape: 4 pairs x 256 tokens (half prompt), D = 128, V = 32000, fp32
PAIRS, T, D, V = 4, 256, 128, 32000
BUDGET = 8 * 2**20


def _inputs(v=V):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2 * PAIRS, T, D, generator=g)
    w = torch.randn(v, D, generator=g) * 0.05
    y = torch.randint(0, v, (2 * PAIRS, T), generator=g)
    y[:, : T // 2] = -100
    ref = dict(ref_hidden=torch.randn(2 * PAIRS, T, D, generator=g), ref_weight=torch.randn(v, D, generator=g) * 0.05)
    return h, w, y, ref


CASES = {
    "sigmoid": dict(loss_type="sigmoid"),
    "sigmoid+ref-head": dict(loss_type="sigmoid", ref_head=True),
    "expo": dict(loss_type="expo", ref_head=True),
    "ipo+softcap": dict(loss_type="ipo", softcap=30.0),
    "simpo+scale+bias": dict(loss_type="simpo", logit_scale=0.7, bias=True),
    "jsd": dict(divergence=0.5),
}


def _transient(case, frozen, v=V):
    kw = dict(CASES[case])
    h, w, y, ref = _inputs(v)
    h.requires_grad_()
    w.requires_grad_(not frozen)
    bias = torch.zeros(v, requires_grad=not frozen) if kw.pop("bias", False) else None
    if "divergence" in kw:
        def step():
            fusedpref.linear_divergence(h, w, ref["ref_hidden"], ref["ref_weight"], y, mix=kw["divergence"],
                                        backend="torch").sum().backward()
    else:
        extra = ref if kw.pop("ref_head", False) else ({} if kw["loss_type"] == "simpo" else
                                                       dict(ref_logps=torch.zeros(2 * PAIRS)))

        def step():
            fusedpref.preference_loss(h, w, y, bias=bias, backend="torch", **kw, **extra)[0].backward()
    step()                                   # warm: lazy imports, first-call allocations
    h.grad = w.grad = None
    with PeakMemory() as mem:
        step()
    return mem.transient, mem.at_peak


@pytest.mark.parametrize("case,frozen", [(c, False) for c in CASES] + [
    pytest.param(c, True, marks=pytest.mark.slow) for c in ("sigmoid", "expo", "ipo+softcap")],
                         ids=lambda x: {False: "trainable", True: "frozen"}.get(x, x) if isinstance(x, bool) else x)
def test_transient_memory_is_the_chunk_budget_plus_a_few_rows_buffers(case, frozen):
    got, at_peak = _transient(case, frozen)
    rows = 2 * PAIRS * T * D * 4                  # one fp32 N x D buffer: 1 MiB here
    assert got <= BUDGET + 3 * rows, (f"{case}: {got / 2**20:.2f} MiB transient > the 8 MiB budget + 3 MiB", at_peak)


def test_transient_memory_does_not_grow_with_the_vocabulary():
    small, _ = _transient("expo", False, V)
    large, _ = _transient("expo", False, 2 * V)
    assert abs(large - small) <= 0.1 * 2**20, (small, large)
