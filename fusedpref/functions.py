"""torch.autograd.Function per primitive. Backward takes ANY per-token upstream gradient, so
the kernels never know which loss they serve."""
from __future__ import annotations

import torch

from . import chunked
from ._checks import check_head, check_softcap, check_targets, resolve_backend


def _backend_module(name: str):
    if name == "triton":
        from . import ops  # imported lazily: the torch backend needs no triton

        return ops
    return chunked


def _compact(targets: torch.Tensor, ignore_index: int):
    flat = targets.reshape(-1)
    idx = (flat != ignore_index).nonzero().squeeze(1)
    return idx, flat.index_select(0, idx)


def _rows(hidden: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)


def _scatter_rows(values: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    out = values.new_zeros((n,) + tuple(values.shape[1:]))
    out.index_copy_(0, idx, values)
    return out


def _policy_grads(hidden, weight, bias, idx, n, needs, compute):
    """(dH, dW, db) of a policy head from compute(valid_rows) -> (dh_rows, dw, db_fp32).

    Zeros when no row is valid; dH rows are scattered back to the full [..., D] shape."""
    need_h, need_w, need_b = needs
    if idx.numel() == 0:
        return tuple(torch.zeros_like(t) if need else None
                     for t, need in ((hidden, need_h), (weight, need_w), (bias, need_b)))
    dh_v, dw, db = compute(_rows(hidden, idx))
    dh = _scatter_rows(dh_v, idx, n).view(hidden.shape) if need_h else None
    return dh, dw, (db.to(bias.dtype) if need_b else None)


def _check_pair(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, ignore_index, softcap,
                backend):
    """Validates a policy head and a reference head over one vocabulary; (backend, softcap)."""
    check_head(hidden, weight, bias)
    check_head(ref_hidden, ref_weight, ref_bias, names=("ref_hidden", "ref_weight", "ref_bias"))
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight has V={ref_weight.shape[0]} but weight has V={weight.shape[0]}: "
                         "the two heads must share the vocabulary")
    if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise ValueError(f"ref_hidden leading dims {list(ref_hidden.shape[:-1])} must equal hidden's "
                         f"{list(hidden.shape[:-1])}")
    if ref_hidden.device != hidden.device:
        raise ValueError(f"ref_hidden is on {ref_hidden.device} but hidden is on {hidden.device}")
    check_targets(hidden, targets, weight.shape[0], ignore_index)
    return _backend_module(resolve_backend(backend, hidden.device)), check_softcap(softcap)


def _ref_rows(ref_hidden, ref_weight, ref_bias, idx):
    """The reference head, detached (it never gets a gradient), at the valid rows."""
    return (_rows(ref_hidden.detach(), idx), ref_weight.detach(),
            None if ref_bias is None else ref_bias.detach())


class LinearLogProbs(torch.autograd.Function):
    """logp = log_softmax(softcap(hidden @ weight.T + bias))[targets], 0 at ignore_index.

    apply(hidden, weight, targets, bias, ignore_index, softcap, backend, with_stats)
    -> (logp float32 [*targets.shape], stats float32 [*targets.shape, 3] or [0]).
    stats (detached, 0 on ignored rows) = (sum of logits over V, entropy, argmax == target).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias=None, ignore_index=-100, softcap=None,
                backend="auto", with_stats=False):
        check_head(hidden, weight, bias)
        check_targets(hidden, targets, weight.shape[0], ignore_index)
        softcap = check_softcap(softcap)
        impl = _backend_module(resolve_backend(backend, hidden.device))
        n = targets.numel()
        idx, y = _compact(targets, ignore_index)
        logp = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        stats = torch.zeros((n, 3) if with_stats else (0,), dtype=torch.float32, device=hidden.device)
        lse = torch.empty(0, dtype=torch.float32, device=hidden.device)
        if idx.numel():
            logp_v, lse, stats_v = impl.logprob_forward(
                _rows(hidden, idx), weight, bias, y, softcap, with_stats)
            logp.index_copy_(0, idx, logp_v)
            if with_stats:
                stats.index_copy_(0, idx, stats_v)
        ctx.mark_non_differentiable(stats)
        ctx.impl, ctx.softcap, ctx.n = impl, softcap, n
        if any(ctx.needs_input_grad[i] for i in (0, 1, 3)):
            ctx.save_for_backward(hidden, weight, bias, idx, y, lse)
        stats = stats.view(*targets.shape, 3) if with_stats else stats
        return logp.view(targets.shape), stats

    @staticmethod
    def backward(ctx, grad_logp, _grad_stats):
        hidden, weight, bias, idx, y, lse = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
        g = grad_logp.reshape(-1).index_select(0, idx)    # autograd materialises zero grads
        dh, dw, db = _policy_grads(hidden, weight, bias, idx, ctx.n, needs, lambda rows: ctx.impl.logprob_backward(
            rows, weight, bias, y, lse, g, ctx.softcap, *needs))
        return dh, dw, None, db, None, None, None, None


def linear_logprobs(hidden, weight, targets, *, bias=None, ignore_index=-100, softcap=None,
                    backend="auto"):
    """Per-token log-probabilities of a linear LM head without an N x V tensor.

    hidden [..., D] and weight [V, D] of one dtype (float32, float16 or bfloat16), bias [V] or
    None, targets [...] integer. Returns float32 of targets' shape, 0.0 where ignore_index.
    """
    logp, _ = LinearLogProbs.apply(hidden, weight, targets, bias, ignore_index, softcap, backend, False)
    return logp


class LinearKL(torch.autograd.Function):
    """Per-token KL(p_ref || p_theta) over the full vocabulary between two linear heads.

    apply(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, ignore_index, softcap,
    backend) -> float32 [*targets.shape]; targets only mark the rows that count (0 elsewhere).
    Gradients flow to the policy (hidden, weight, bias) only.
    """

    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, targets, bias=None, ref_bias=None,
                ignore_index=-100, softcap=None, backend="auto"):
        impl, softcap = _check_pair(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets,
                                    ignore_index, softcap, backend)
        n = targets.numel()
        idx, _ = _compact(targets, ignore_index)
        kl = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        rh, rw, rb = _ref_rows(ref_hidden, ref_weight, ref_bias, idx)
        lse = rlse = kl.new_empty(0)
        if idx.numel():
            kl_v, lse, rlse, *_ = impl.kl_forward(_rows(hidden, idx), weight, bias, rh, rw, rb, softcap)
            kl.index_copy_(0, idx, kl_v)
        ctx.impl, ctx.softcap, ctx.n = impl, softcap, n
        if any(ctx.needs_input_grad[i] for i in (0, 1, 5)):
            ctx.save_for_backward(hidden, weight, bias, rh, rw, rb, idx, lse, rlse)
        return kl.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_kl):
        hidden, weight, bias, rh, rw, rb, idx, lse, rlse = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[5])
        g = grad_kl.reshape(-1).index_select(0, idx)
        dh, dw, db = _policy_grads(hidden, weight, bias, idx, ctx.n, needs, lambda rows: ctx.impl.kl_backward(
            rows, weight, bias, rh, rw, rb, lse, rlse, g, ctx.softcap, *needs))
        return dh, dw, None, None, None, db, None, None, None, None


def linear_kl(hidden, weight, ref_hidden, ref_weight, targets, *, bias=None, ref_bias=None,
              ignore_index=-100, softcap=None, backend="auto"):
    """Per-token KL(p_ref || p_theta) [targets.shape] float32; 0 where targets == ignore_index."""
    return LinearKL.apply(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, ignore_index,
                          softcap, backend)


class LinearLogProbsKL(torch.autograd.Function):
    """The policy's and the reference's per-token log-probs and KL(p_ref || p_theta), all from one
    pass over both heads (EXPO's per-token work; LinearLogProbs + a reference forward + LinearKL
    would read each head three times).

    apply(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, ignore_index, softcap,
    backend, with_stats) -> (logp, ref_logp, kl) float32 [*targets.shape] and stats as in
    LinearLogProbs; 0 where ignore_index. Gradients flow to the policy (hidden, weight, bias) from
    logp and kl, through one backward pass: dz = g_lp (onehot - p) + g_kl (p - p_ref).
    ref_logp and stats are not differentiable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, targets, bias=None, ref_bias=None,
                ignore_index=-100, softcap=None, backend="auto", with_stats=False):
        impl, softcap = _check_pair(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets,
                                    ignore_index, softcap, backend)
        n = targets.numel()
        idx, y = _compact(targets, ignore_index)
        zeros = dict(dtype=torch.float32, device=hidden.device)
        logp, ref_logp, kl = torch.zeros(n, **zeros), torch.zeros(n, **zeros), torch.zeros(n, **zeros)
        stats = torch.zeros((n, 3) if with_stats else (0,), **zeros)
        rh, rw, rb = _ref_rows(ref_hidden, ref_weight, ref_bias, idx)
        lse = rlse = kl.new_empty(0)
        if idx.numel():
            kl_v, lse, rlse, logp_v, ref_v, stats_v = impl.kl_forward(
                _rows(hidden, idx), weight, bias, rh, rw, rb, softcap, y=y, with_stats=with_stats)
            for out, v in ((kl, kl_v), (logp, logp_v), (ref_logp, ref_v)):
                out.index_copy_(0, idx, v)
            if with_stats:
                stats.index_copy_(0, idx, stats_v)
        ctx.impl, ctx.softcap, ctx.n = impl, softcap, n
        if any(ctx.needs_input_grad[i] for i in (0, 1, 5)):
            ctx.save_for_backward(hidden, weight, bias, rh, rw, rb, idx, y, lse, rlse)
        shape = targets.shape
        ref_logp, stats = ref_logp.view(shape), stats.view(*shape, 3) if with_stats else stats
        ctx.mark_non_differentiable(ref_logp, stats)   # the returned tensors themselves
        return logp.view(shape), ref_logp, kl.view(shape), stats

    @staticmethod
    def backward(ctx, grad_logp, _grad_ref, grad_kl, _grad_stats):
        hidden, weight, bias, rh, rw, rb, idx, y, lse, rlse = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[5])
        g_lp = grad_logp.reshape(-1).index_select(0, idx)  # autograd materialises zero grads
        g_kl = grad_kl.reshape(-1).index_select(0, idx)
        dh, dw, db = _policy_grads(hidden, weight, bias, idx, ctx.n, needs, lambda rows: ctx.impl.kl_backward(
            rows, weight, bias, rh, rw, rb, lse, rlse, g_kl, ctx.softcap, *needs, y=y, g_lp=g_lp))
        return dh, dw, None, None, None, db, None, None, None, None, None


def linear_logprobs_kl(hidden, weight, ref_hidden, ref_weight, targets, *, bias=None, ref_bias=None,
                       ignore_index=-100, softcap=None, backend="auto"):
    """(logp, ref_logp, kl), each float32 [targets.shape], from one pass over both heads;
    0 where targets == ignore_index. Gradients reach the policy head through logp and kl."""
    logp, ref_logp, kl, _ = LinearLogProbsKL.apply(hidden, weight, ref_hidden, ref_weight, targets, bias,
                                                   ref_bias, ignore_index, softcap, backend, False)
    return logp, ref_logp, kl
