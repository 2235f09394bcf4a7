"""Input validation shared by every entry point: errors name the argument and what was expected."""
from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "triton", "torch")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_head(hidden, weight, bias, *, names=("hidden", "weight", "bias")):
    """Checks one linear head: hidden [..., D], weight [V, D], bias [V] or None."""
    hn, wn, bn = names
    for name, t in ((hn, hidden), (wn, weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{hn} must be float32, float16 or bfloat16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{wn} dtype {weight.dtype} must equal {hn} dtype {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError(f"{hn} must have shape [..., D], got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"{wn} must have shape [V, D], got {_shape(weight)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{wn} has D={weight.shape[1]} but {hn} has D={hidden.shape[-1]} "
                         f"(shapes {_shape(weight)} and {_shape(hidden)})")
    if weight.shape[0] == 0:
        raise ValueError(f"{wn} must have at least one vocabulary row, got {_shape(weight)}")
    if weight.device != hidden.device:
        raise ValueError(f"{wn} is on {weight.device} but {hn} is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{bn} must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{bn} must be float32, float16 or bfloat16, got {bias.dtype}")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{bn} must have shape [V]=[{weight.shape[0]}], got {_shape(bias)}")
        if bias.device != hidden.device:
            raise ValueError(f"{bn} is on {bias.device} but {hn} is on {hidden.device}")


def check_targets(hidden, targets, vocab: int, ignore_index: int, *, names=("hidden", "targets")):
    hn, tn = names
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{tn} must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"{tn} must be an integer tensor (int64 or int32), got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{tn} shape {_shape(targets)} must equal the leading dims of {hn} "
                         f"{_shape(hidden)} (i.e. {list(hidden.shape[:-1])})")
    if targets.device != hidden.device:
        raise ValueError(f"{tn} is on {targets.device} but {hn} is on {hidden.device}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if targets.numel():
        bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
        if bool(bad.any()):
            first = targets[bad].flatten()[0].item()
            raise ValueError(f"{tn} must lie in [0, V={vocab}) or equal ignore_index={ignore_index}; "
                             f"found {first} ({int(bad.sum())} such entries)")


def check_softcap(softcap):
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a positive float or None, got {type(softcap).__name__}")
    if not softcap > 0 or softcap != softcap or softcap == float("inf"):
        raise ValueError(f"softcap must be a positive finite float or None, got {softcap}")
    return float(softcap)


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors (got {device}), or TRITON_INTERPRET=1 "
                         "set before triton is imported to run the kernels in the interpreter")
    return backend
