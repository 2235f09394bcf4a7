"""Input validation shared by every entry point: errors name the argument and what was expected.

Checks of shapes, dtypes and devices are static (they never read tensor data), so they run
inside torch.compile'd code without guarding on data. The one data-dependent check, that every
target lies in [0, V) or equals ignore_index, runs inside the custom ops (fusedpref/_library.py),
where the valid rows are compacted anyway; it raises the same ValueError eagerly and compiled.
"""
from __future__ import annotations

import math
import numbers
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
BACKENDS = ("auto", "triton", "torch")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_head(hidden, weight, bias, *, names=("hidden", "weight", "bias"), allow_empty=False):
    """Checks one linear head: hidden [..., D], weight [V, D], bias [V] or None (V = 0 only with
    allow_empty: a vocabulary shard)."""
    hn, wn, bn = names
    for name, t in ((hn, hidden), (wn, weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{hn} must be float32, float16, bfloat16 (or float64 on the torch backend), "
                        f"got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{wn} dtype {weight.dtype} must equal {hn} dtype {hidden.dtype} (outside "
                        "torch.autocast; under autocast both are cast to the autocast dtype)")
    if hidden.dim() < 1:
        raise ValueError(f"{hn} must have shape [..., D], got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"{wn} must have shape [V, D], got {_shape(weight)}")
    if hidden.shape[-1] == 0:
        raise ValueError(f"{hn} must have a hidden size D >= 1, got shape {_shape(hidden)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{wn} has D={weight.shape[1]} but {hn} has D={hidden.shape[-1]} "
                         f"(shapes {_shape(weight)} and {_shape(hidden)})")
    if weight.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{wn} must have at least one vocabulary row, got {_shape(weight)}")
    if weight.device != hidden.device:
        raise ValueError(f"{wn} is on {weight.device} but {hn} is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{bn} must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{bn} must be a floating tensor, got {bias.dtype}")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{bn} must have shape [V]=[{weight.shape[0]}], got {_shape(bias)}")
        if bias.device != hidden.device:
            raise ValueError(f"{bn} is on {bias.device} but {hn} is on {hidden.device}")


def check_ignore_index(ignore_index) -> int:
    """Any integer (Python or NumPy) -> int."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an integer, got {type(ignore_index).__name__}")
    return int(ignore_index)


def check_targets(hidden, targets, *, names=("hidden", "targets")) -> torch.Tensor:
    """Static checks of targets [...] = hidden.shape[:-1]; returns them flattened as int64 (the
    caller's tensor is not modified). The range check runs in the custom ops."""
    hn, tn = names
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{tn} must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in INT_DTYPES:
        raise TypeError(f"{tn} must be an integer tensor (int8, uint8, int16, int32 or int64), got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{tn} shape {_shape(targets)} must equal the leading dims of {hn} "
                         f"{_shape(hidden)} (i.e. {list(hidden.shape[:-1])})")
    if targets.device != hidden.device:
        raise ValueError(f"{tn} is on {targets.device} but {hn} is on {hidden.device}")
    return targets.reshape(-1).long()


def range_error(targets: torch.Tensor, vocab: int, ignore_index: int, name: str = "targets"):
    """ValueError for the first target outside [0, V) that is not ignore_index, or None."""
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if not bool(bad.any()):
        return None
    first = targets[bad].flatten()[0].item()
    return ValueError(f"{name} must lie in [0, V={vocab}) or equal ignore_index={ignore_index}; "
                      f"found {first} ({int(bad.sum())} such entries)")


def check_softcap(softcap, name="softcap"):
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"{name} must be a positive float or None, got {type(softcap).__name__}")
    if not (softcap > 0 and math.isfinite(softcap)):
        raise ValueError(f"{name} must be a positive finite float or None, got {softcap}")
    return float(softcap)


def check_scale(scale, name="logit_scale"):
    """A logit scale (multiplier after the soft-cap): None, or a finite nonzero real; 1 -> None."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name} must be a finite nonzero float or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale != 0):
        raise ValueError(f"{name} must be a finite nonzero float or None, got {scale}")
    return None if scale == 1 else float(scale)


def check_temperature(temperature, name="temperature"):
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"{name} must be a positive float, got {type(temperature).__name__}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"{name} must be a positive finite float, got {temperature}")
    return float(temperature)


def check_mix(mix, name="mix"):
    """The divergence's mixture weight: 0 = KL(ref || policy), 1 = KL(policy || ref), between = JSD."""
    if isinstance(mix, bool) or not isinstance(mix, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(mix).__name__}")
    if not 0 <= mix <= 1:
        raise ValueError(f"{name} must lie in [0, 1] (0: KL(ref || policy), 1: KL(policy || ref), between: "
                         f"the generalised JSD), got {mix}")
    return float(mix)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and dtype != torch.float64 else "torch"
    if backend == "triton":
        if dtype == torch.float64:
            raise TypeError("backend='triton' runs float32, float16 and bfloat16; float64 (e.g. for "
                            "torch.autograd.gradcheck) runs on backend='torch'")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' needs CUDA tensors (got {device}), or TRITON_INTERPRET=1 "
                             "set before triton is imported to run the kernels in the interpreter")
    return backend


def autocast_dtype(device: torch.device):
    """The autocast dtype if torch.autocast is on for this device type, else None."""
    kind = device.type
    try:
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except (RuntimeError, TypeError):   # a device type autocast does not know
        return None
    return None
