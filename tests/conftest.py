"""Test setup: without CUDA the Triton kernels run in the interpreter (set before triton loads);
every kernel output buffer starts as NaN; the chunking fixture; the fast tier. Helpers live in
helpers.py.

The fast tier (`pytest -m "not slow"`, a few minutes on 2 cores) runs every kernel and backend
correctness test at small shapes; `slow` are the subprocess, gloo, TRL-trainer, AOT, bench-CLI
and examples tests (marked in their modules) and, of the kernel tests' cross products, the
parametrizations that repeat a path the fast tier already runs: the default one-chunk variant of
tests that also run with 97-column chunks (the multi-chunk loops are a superset of its code),
float16 beside bfloat16 (both 16-bit operand paths), and the 16-bit variants in the Triton
interpreter, which upcasts 16-bit dots to fp32 (so they differ from its fp32 run only by the
operands' rounding, which the torch backend's bf16 runs cover; the real 16-bit dots run on the
GPU). CI runs everything."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers import CHUNKINGS, poisoned_empty  # noqa: E402


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every kernel output buffer starts as NaN: an unwritten element fails the test."""
    from fusedpref import config

    monkeypatch.setattr(config, "empty", poisoned_empty)


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


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.slow
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        dtype = params.get("dtype")
        if params.get("chunking") == "one-chunk" or dtype is torch.float16 or (
                params.get("backend") == "triton" and dtype is torch.bfloat16):
            item.add_marker(slow)
