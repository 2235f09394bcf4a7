"""Test setup: without CUDA the Triton kernels run in the interpreter (set before triton loads)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"

# atol of the tolerance rule |fused - oracle| <= 2 |eager same dtype - oracle| + atol
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every kernel output buffer starts as NaN: an unwritten element fails the test."""
    monkeypatch.setenv("FUSEDPREF_POISON", "1")


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within(name, fused, eager, oracle, dtype, atol=None):
    """The suite's tolerance rule: fused error <= 2 x eager-same-dtype error + a small atol
    (times max(1, max |oracle|))."""
    assert fused is not None and oracle is not None, name
    assert fused.shape == oracle.shape, (name, fused.shape, oracle.shape)
    assert torch.isfinite(fused).all(), f"{name}: non-finite values"
    e_fused = max_err(fused, oracle)
    e_eager = max_err(eager, oracle)
    # the atol is relative to the values' scale when they exceed 1 (a loss summed over pairs)
    scale = max(1.0, oracle.detach().abs().max().item()) if oracle.numel() else 1.0
    bound = 2 * e_eager + (ATOL[dtype] if atol is None else atol) * scale
    assert e_fused <= bound, f"{name}: fused err {e_fused:.3g} > bound {bound:.3g} (eager err {e_eager:.3g})"


# 97 columns: a prime, so chunk boundaries fall inside the interpreter's 64-wide vocabulary tiles;
# V=1009 spans 11 chunks, V=130 two. "one" is the default budget (V <= 1009 is one chunk).
CHUNKINGS = {"one-chunk": None, "chunks97": "97"}


@pytest.fixture(params=list(CHUNKINGS))
def chunking(request, monkeypatch):
    """Runs a test with the default vocabulary chunk and with many small ones (both backends'
    chunk loops, the Triton backward's per-chunk offsets, the torch forward's statistics)."""
    cols = CHUNKINGS[request.param]
    if cols is None:
        monkeypatch.delenv("FUSEDPREF_CHUNK_COLS", raising=False)
    else:
        monkeypatch.setenv("FUSEDPREF_CHUNK_COLS", cols)
    return request.param
