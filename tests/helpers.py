"""Shared by the tests (imported by them and by conftest.py; never import conftest itself): the
device, the tolerance rule, random problem builders, the NaN-poisoning allocator, optional
dependencies."""
import importlib
import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"

# atol of the tolerance rule |fused - oracle| <= 2 |eager same dtype - oracle| + atol
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}

# 97 columns: a prime, so chunk boundaries fall inside the interpreter's 64-wide vocabulary tiles;
# V=1009 spans 11 chunks, V=130 two. "one" is the default budget (V <= 1009 is one chunk).
CHUNKINGS = {"one-chunk": None, "chunks97": "97"}


def _inplace_mm(self_shape, a_shape, b_shape, *args, out_shape=None, **kw):
    """FLOPs of an in-place addmm_ (a [m, k] @ b [k, n]) or baddbmm_ / addbmm_ ([batch, m, k] @ [batch, k, n])."""
    if len(a_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


def matmul_flops(fn) -> int:
    """The matmul FLOPs fn() runs, by FlopCounterMode, with the in-place products it does not
    count by itself (addmm_, baddbmm_, addbmm_: TRL's head accumulates dH and dW with them)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    with FlopCounterMode(display=False, custom_mapping={aten.addmm_: _inplace_mm, aten.baddbmm_: _inplace_mm,
                                                        aten.addbmm_: _inplace_mm}) as counter:
        fn()
    return counter.get_total_flops()


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


def poisoned_empty(shape, dtype, device):
    """fusedpref.config.empty for tests: NaN-filled (integers: -1), so that an element a kernel
    should have written but did not shows up."""
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


def poison():
    """Every kernel output buffer starts as NaN in this process (conftest does it per test with
    monkeypatch; spawned ranks call this)."""
    from fusedpref import config

    config.empty = poisoned_empty


class PeakMemory(torch.utils._python_dispatch.TorchDispatchMode):
    """The peak bytes of the tensor storages that aten ops allocate while active and that are still
    alive (freed storages leave the count: they are weakly referenced), inside fusedpref's custom
    ops too (fusedpref._library.see_inside). `transient` is the peak above what is still alive at
    the end (for a training step: above the gradients it leaves). Storages an op returns that
    share an input's (views, in-place results) are not new allocations and are not counted."""

    def __init__(self):
        super().__init__()
        from fusedpref import _library

        _library.see_inside(PeakMemory)
        self.live, self.now, self.peak, self.at_peak = {}, 0, 0, []

    def _new(self, t, inputs):
        import weakref

        st = t.untyped_storage()
        key, n = st.data_ptr(), st.nbytes()
        if not n or key in self.live or key in inputs:
            return
        self.now += n

        def gone(_, key=key, n=n):
            if self.live.pop(key, None) is not None:
                self.now -= n
        self.live[key] = (weakref.ref(st, gone), self._op, tuple(t.shape))
        if self.now > self.peak:
            self.peak = self.now
            self.at_peak = [(op, shape) for _, op, shape in self.live.values()]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = torch.utils._pytree.tree_flatten((args, kwargs or {}))[0]
        inputs = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        self._op = str(func)
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._new(t, inputs)
        return out

    @property
    def transient(self):
        import gc

        gc.collect()
        return self.peak - self.now


def make_head(n_shape, d, v, dtype, *, bias=False, ignore_frac=0.2, seed=0, scale=1.0,
              ignore_index=-100, device=DEVICE):
    """hidden [*n_shape, d], weight [v, d], bias [v] or None, targets [*n_shape] (fraction ignored)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*n_shape, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) * (scale / d ** 0.5) * 4).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, v, n_shape, generator=g)
    targets[torch.rand(n_shape, generator=g) < ignore_frac] = ignore_index
    out = [hidden.to(device), weight.to(device), None if b is None else b.to(device), targets.to(device)]
    return out


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def optional(module: str):
    """Imports an optional dependency (a comparator, TRL). A user without it gets a skip; under
    FUSEDPREF_REQUIRE_ALL=1 (set by scripts/test.sh, hence CI, which installs them all) a missing
    one is an error, so a failed install cannot turn tests into skips."""
    import pytest

    if os.environ.get("FUSEDPREF_REQUIRE_ALL") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)
