"""The primitives as torch.library custom ops, so that torch.compile (fullgraph=True) treats
each forward and backward as one opaque call with a known output shape (fake implementations
below) instead of tracing into data-dependent code.

Everything that depends on tensor data happens inside an op: the target range check and the
compaction of valid rows (rows whose target is ignore_index cost no matmul work), then the
backend's kernels on the compacted rows. Inputs are flat: hidden [n, D], targets [n] int64.
Outputs are per-row over all n rows (0 on ignored rows) in float32, or float64 for float64
inputs; a gradient that is not needed comes back as an empty tensor.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import chunked
from ._checks import range_error


def _impl(backend: str):
    if backend == "triton":
        from . import ops  # imported lazily: the torch backend needs no triton

        return ops
    return chunked


def _valid_rows(targets: Tensor, ignore_index: int, vocab: int | None = None):
    """(indices, targets) of the valid rows; with vocab, first the range check."""
    if vocab is not None:
        err = range_error(targets, vocab, ignore_index)
        if err is not None:
            raise err
    idx = (targets != ignore_index).nonzero().squeeze(1)
    return idx, targets.index_select(0, idx)


def _no_autocast(fn):
    """Runs an op's real implementation with autocast off: its operands already have the dtypes
    chosen outside (autocast casts happen in fusedpref.functions, as F.linear's would)."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next(a for a in args if isinstance(a, Tensor)).device
        with torch.autocast(device.type, enabled=False):
            return fn(*args, **kwargs)
    return run


def _nothing(t: Tensor) -> Tensor:
    return t.new_empty(0)


def _scatter_grads(hidden, weight, bias, idx, got, needs):
    """Full-size (dH, dW, db) from the backend's (dh of valid rows, dW, db); empty if not needed."""
    need_h, need_w, need_b = needs
    dh_v, dw, db = got
    dh = _nothing(hidden)
    if need_h:
        dh = torch.zeros_like(hidden)
        dh.index_copy_(0, idx, dh_v)
    return (dh, dw if need_w else _nothing(weight), db.to(bias.dtype) if need_b else _nothing(hidden))


def _zero_grads(hidden, weight, bias, needs):
    need_h, need_w, need_b = needs
    return (torch.zeros_like(hidden) if need_h else _nothing(hidden),
            torch.zeros_like(weight) if need_w else _nothing(weight),
            torch.zeros_like(bias) if need_b else _nothing(hidden))


def _grad_fakes(hidden, weight, bias, needs):
    need_h, need_w, need_b = needs
    return (torch.empty_like(hidden) if need_h else _nothing(hidden),
            torch.empty_like(weight) if need_w else _nothing(weight),
            torch.empty_like(bias) if need_b else _nothing(hidden))


N_STATS = 4   # columns of the statistics: sum of logits, entropy, argmax hit, log sum_v p^2


def _rows_or_none(t: Optional[Tensor], idx: Tensor) -> Optional[Tensor]:
    return None if t is None else t.index_select(0, idx)


# ---------------------------------------------------------------- log-probabilities of one head

@torch.library.custom_op("fusedpref::logprob_fwd", mutates_args=())
@_no_autocast
def logprob_fwd(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], ignore_index: int,
                softcap: Optional[float], scale: Optional[float], backend: str,
                with_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(logp [n], lse [n], stats [n, 4] or [0])."""
    n = targets.shape[0]
    dt = chunked.acc_dtype(hidden.dtype)
    logp, lse = hidden.new_zeros(n, dtype=dt), hidden.new_zeros(n, dtype=dt)
    stats = hidden.new_zeros((n, N_STATS) if with_stats else (0,), dtype=dt)
    idx, y = _valid_rows(targets, ignore_index, weight.shape[0])
    if idx.numel():
        lp, ls, st = _impl(backend).logprob_forward(hidden.index_select(0, idx), weight, bias, y, softcap,
                                                    with_stats, scale=scale)
        logp.index_copy_(0, idx, lp.to(dt))
        lse.index_copy_(0, idx, ls.to(dt))
        if with_stats:
            stats.index_copy_(0, idx, st.to(dt))
    return logp, lse, stats


@logprob_fwd.register_fake
def _(hidden, weight, targets, bias, ignore_index, softcap, scale, backend, with_stats):
    n = targets.shape[0]
    dt = chunked.acc_dtype(hidden.dtype)
    return (hidden.new_empty(n, dtype=dt), hidden.new_empty(n, dtype=dt),
            hidden.new_empty((n, N_STATS) if with_stats else (0,), dtype=dt))


@torch.library.custom_op("fusedpref::logprob_fwd_frozen", mutates_args=())
@_no_autocast
def logprob_fwd_frozen(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], ignore_index: int,
                       softcap: Optional[float], scale: Optional[float], backend: str,
                       with_stats: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The frozen-head forward: (logp [n], lse [n], stats [n, 4] or [0], d [n, D]) with
    dlogp_i / dh_i = d_i (0 on ignored rows), from one sweep over the vocabulary."""
    n = targets.shape[0]
    dt = chunked.acc_dtype(hidden.dtype)
    logp, lse = hidden.new_zeros(n, dtype=dt), hidden.new_zeros(n, dtype=dt)
    stats = hidden.new_zeros((n, N_STATS) if with_stats else (0,), dtype=dt)
    direction = hidden.new_zeros((n, hidden.shape[1]), dtype=dt)
    idx, y = _valid_rows(targets, ignore_index, weight.shape[0])
    if idx.numel():
        lp, ls, st, d = _impl(backend).logprob_forward_frozen(hidden.index_select(0, idx), weight, bias, y, softcap,
                                                              with_stats, scale=scale)
        logp.index_copy_(0, idx, lp.to(dt))
        lse.index_copy_(0, idx, ls.to(dt))
        direction.index_copy_(0, idx, d.to(dt))
        if with_stats:
            stats.index_copy_(0, idx, st.to(dt))
    return logp, lse, stats, direction


@logprob_fwd_frozen.register_fake
def _(hidden, weight, targets, bias, ignore_index, softcap, scale, backend, with_stats):
    n = targets.shape[0]
    dt = chunked.acc_dtype(hidden.dtype)
    return (hidden.new_empty(n, dtype=dt), hidden.new_empty(n, dtype=dt),
            hidden.new_empty((n, N_STATS) if with_stats else (0,), dtype=dt),
            hidden.new_empty((n, hidden.shape[1]), dtype=dt))


@torch.library.custom_op("fusedpref::logprob_bwd", mutates_args=())
@_no_autocast
def logprob_bwd(grad: Tensor, grad_stats: Optional[Tensor], hidden: Tensor, weight: Tensor, targets: Tensor,
                bias: Optional[Tensor], lse: Tensor, stats: Optional[Tensor], ignore_index: int,
                softcap: Optional[float], scale: Optional[float], backend: str, need_h: bool, need_w: bool,
                need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_i grad_i logp_i (+ <grad_stats_i, stats_i>): (dH [n, D], dW [V, D], db [V]),
    empty where not needed."""
    needs = (need_h, need_w, need_b)
    idx, y = _valid_rows(targets, ignore_index)
    if idx.numel() == 0:
        return _zero_grads(hidden, weight, bias, needs)
    got = _impl(backend).logprob_backward(hidden.index_select(0, idx), weight, bias, y, lse.index_select(0, idx),
                                          grad.index_select(0, idx), softcap, *needs, scale=scale,
                                          g_stats=_rows_or_none(grad_stats, idx), stats=_rows_or_none(stats, idx))
    return _scatter_grads(hidden, weight, bias, idx, got, needs)


@logprob_bwd.register_fake
def _(grad, grad_stats, hidden, weight, targets, bias, lse, stats, ignore_index, softcap, scale, backend, need_h,
      need_w, need_b):
    return _grad_fakes(hidden, weight, bias, (need_h, need_w, need_b))


# ---------------------------------------------------------------- divergence between two heads (+ log-probs)

@torch.library.custom_op("fusedpref::kl_fwd", mutates_args=())
@_no_autocast
def kl_fwd(hidden: Tensor, weight: Tensor, ref_hidden: Tensor, ref_weight: Tensor, targets: Tensor,
           bias: Optional[Tensor], ref_bias: Optional[Tensor], ignore_index: int, softcap: Optional[float],
           scale: Optional[float], ref_softcap: Optional[float], ref_scale: Optional[float], div: int, beta: float,
           backend: str, with_logp: bool, with_stats: bool
           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(divergence, lse, rlse, aux [n]; logp, ref_logp [n] or [0]; stats [n, 4] or [0]) from one
    pass over both heads (two for the JSD). div: 0 KL(ref || policy), 1 KL(policy || ref), 2 JSD;
    aux: what the backward needs (div 1: the KL, div 2: KL(p || m); 0 for div 0)."""
    n = targets.shape[0]
    dt = chunked.acc_dtype(hidden.dtype)
    dv, lse, rlse, aux = (hidden.new_zeros(n, dtype=dt) for _ in range(4))
    logp, ref_logp = (hidden.new_zeros(n if with_logp else 0, dtype=dt) for _ in range(2))
    stats = hidden.new_zeros((n, N_STATS) if with_stats else (0,), dtype=dt)
    idx, y = _valid_rows(targets, ignore_index, weight.shape[0])
    if idx.numel():
        got = _impl(backend).kl_forward(hidden.index_select(0, idx), weight, bias, ref_hidden.index_select(0, idx),
                                        ref_weight, ref_bias, softcap, y=y if with_logp else None,
                                        with_stats=with_stats, scale=scale, ref_softcap=ref_softcap,
                                        ref_scale=ref_scale, div=div, beta=beta)
        for out, v in zip((dv, lse, rlse, logp, ref_logp, stats, aux), got):
            if v is not None:
                out.index_copy_(0, idx, v.to(dt))
    return dv, lse, rlse, aux, logp, ref_logp, stats


@kl_fwd.register_fake
def _(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, ignore_index, softcap, scale, ref_softcap,
      ref_scale, div, beta, backend, with_logp, with_stats):
    n = targets.shape[0]
    dt = chunked.acc_dtype(hidden.dtype)
    e = [hidden.new_empty(k, dtype=dt) for k in (n, n, n, n, n if with_logp else 0, n if with_logp else 0)]
    return (*e, hidden.new_empty((n, N_STATS) if with_stats else (0,), dtype=dt))


@torch.library.custom_op("fusedpref::kl_fwd_frozen", mutates_args=())
@_no_autocast
def kl_fwd_frozen(hidden: Tensor, weight: Tensor, ref_hidden: Tensor, ref_weight: Tensor, targets: Tensor,
                  bias: Optional[Tensor], ref_bias: Optional[Tensor], ignore_index: int, softcap: Optional[float],
                  scale: Optional[float], ref_softcap: Optional[float], ref_scale: Optional[float], backend: str,
                  with_logp: bool, with_stats: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """KL(ref || policy) with a frozen policy head, one sweep: (kl, lse, rlse [n]; logp, ref_logp [n]
    or [0]; stats [n, 4] or [0]; d_lp [n, D] or [0] (dlogp/dh); d_kl [n, D] (dKL/dh))."""
    n, width = targets.shape[0], hidden.shape[1]
    dt = chunked.acc_dtype(hidden.dtype)
    kl, lse, rlse = (hidden.new_zeros(n, dtype=dt) for _ in range(3))
    logp, ref_logp = (hidden.new_zeros(n if with_logp else 0, dtype=dt) for _ in range(2))
    stats = hidden.new_zeros((n, N_STATS) if with_stats else (0,), dtype=dt)
    d_lp = hidden.new_zeros((n, width) if with_logp else (0,), dtype=dt)
    d_kl = hidden.new_zeros((n, width), dtype=dt)
    idx, y = _valid_rows(targets, ignore_index, weight.shape[0])
    if idx.numel():
        got = _impl(backend).kl_forward_frozen(hidden.index_select(0, idx), weight, bias,
                                               ref_hidden.index_select(0, idx), ref_weight, ref_bias, softcap,
                                               y=y if with_logp else None, with_stats=with_stats, scale=scale,
                                               ref_softcap=ref_softcap, ref_scale=ref_scale)
        for out, v in zip((kl, lse, rlse, logp, ref_logp, stats, d_lp, d_kl), got):
            if v is not None:
                out.index_copy_(0, idx, v.to(dt))
    return kl, lse, rlse, logp, ref_logp, stats, d_lp, d_kl


@kl_fwd_frozen.register_fake
def _(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, ignore_index, softcap, scale, ref_softcap,
      ref_scale, backend, with_logp, with_stats):
    n, width = targets.shape[0], hidden.shape[1]
    dt = chunked.acc_dtype(hidden.dtype)
    e = [hidden.new_empty(k, dtype=dt) for k in (n, n, n, n if with_logp else 0, n if with_logp else 0)]
    return (*e, hidden.new_empty((n, N_STATS) if with_stats else (0,), dtype=dt),
            hidden.new_empty((n, width) if with_logp else (0,), dtype=dt), hidden.new_empty((n, width), dtype=dt))


@torch.library.custom_op("fusedpref::kl_bwd", mutates_args=())
@_no_autocast
def kl_bwd(grad_div: Tensor, grad_logp: Optional[Tensor], grad_stats: Optional[Tensor], hidden: Tensor,
           weight: Tensor, ref_hidden: Tensor, ref_weight: Tensor, targets: Tensor, bias: Optional[Tensor],
           ref_bias: Optional[Tensor], lse: Tensor, rlse: Tensor, aux: Tensor, stats: Optional[Tensor],
           ignore_index: int, softcap: Optional[float], scale: Optional[float], ref_softcap: Optional[float],
           ref_scale: Optional[float], div: int, beta: float, backend: str, need_h: bool, need_w: bool,
           need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_i grad_div_i div_i (+ grad_logp_i logp_i + <grad_stats_i, stats_i>) w.r.t.
    the policy head, one recompute."""
    needs = (need_h, need_w, need_b)
    idx, y = _valid_rows(targets, ignore_index)
    if idx.numel() == 0:
        return _zero_grads(hidden, weight, bias, needs)
    rows = lambda t: _rows_or_none(t, idx)  # noqa: E731
    got = _impl(backend).kl_backward(
        rows(hidden), weight, bias, rows(ref_hidden), ref_weight, ref_bias, rows(lse), rows(rlse), rows(grad_div),
        softcap, *needs, y=y if grad_logp is not None else None, g_lp=rows(grad_logp), scale=scale,
        ref_softcap=ref_softcap, ref_scale=ref_scale, div=div, beta=beta, aux=rows(aux) if div else None,
        g_stats=rows(grad_stats), stats=rows(stats))
    return _scatter_grads(hidden, weight, bias, idx, got, needs)


@kl_bwd.register_fake
def _(grad_div, grad_logp, grad_stats, hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, lse, rlse,
      aux, stats, ignore_index, softcap, scale, ref_softcap, ref_scale, div, beta, backend, need_h, need_w, need_b):
    return _grad_fakes(hidden, weight, bias, (need_h, need_w, need_b))


# ---------------------------------------------------------------- FLOP accounting

def _count_inside(mode, func, types, args, kwargs):
    """torch.utils.flop_counter.FlopCounterMode sees the matmuls inside the ops (it would see one
    opaque call otherwise): the real implementation runs with the mode active."""
    with mode:
        return _IMPLS[func](*args, **kwargs)


def _register_flop_counting():
    from torch.utils import flop_counter

    # FlopCounterMode pushes a private TorchDispatchMode (torch >= 2.5); older ones are the mode
    mode = getattr(flop_counter, "_FlopCounterMode", flop_counter.FlopCounterMode)
    for op in (logprob_fwd, logprob_fwd_frozen, logprob_bwd, kl_fwd, kl_fwd_frozen, kl_bwd):
        _IMPLS[op._opoverload] = op._init_fn
        op.register_torch_dispatch(mode, _count_inside)


_IMPLS: dict = {}
_register_flop_counting()
