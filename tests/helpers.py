"""Random problem builders shared by the tests."""
import torch

from conftest import DEVICE


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
    import importlib
    import os

    import pytest

    if os.environ.get("FUSEDPREF_REQUIRE_ALL") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)
