"""torch.autograd.Function per primitive. Backward takes ANY per-token upstream gradient, so
the kernels never know which loss they serve.

Each Function validates its inputs (static checks only: shapes, dtypes, devices), applies
torch.autocast as F.linear would (operands cast to the autocast dtype; the engine returns the
gradients of fp32 master weights in fp32), flattens the rows and calls the custom ops of
fusedpref/_library.py, which hold everything data-dependent. So a step calling them compiles
with torch.compile(fullgraph=True).
"""
from __future__ import annotations

import torch

from . import _library
from ._checks import (autocast_dtype, check_head, check_ignore_index, check_softcap, check_targets,
                      resolve_backend)


def _autocast(*tensors):
    """Under torch.autocast for the tensors' device: floating tensors cast to the autocast dtype."""
    first = next(t for t in tensors if t is not None)
    dt = autocast_dtype(first.device) if isinstance(first, torch.Tensor) else None
    if dt is None:
        return tensors
    return tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def _check_one(hidden, weight, bias, targets, ignore_index, softcap, backend):
    """Validates a policy head; (flat hidden [n, D], flat int64 targets, ignore_index, softcap, backend)."""
    check_head(hidden, weight, bias)
    y = check_targets(hidden, targets)
    backend = resolve_backend(backend, hidden.device, hidden.dtype)
    return hidden.reshape(-1, hidden.shape[-1]), y, check_ignore_index(ignore_index), check_softcap(softcap), backend


def _check_ref(hidden, weight, ref_hidden, ref_weight, ref_bias):
    """Validates a reference head against the policy head: one vocabulary, same rows."""
    check_head(ref_hidden, ref_weight, ref_bias, names=("ref_hidden", "ref_weight", "ref_bias"))
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight has V={ref_weight.shape[0]} but weight has V={weight.shape[0]}: "
                         "the two heads must share the vocabulary")
    if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise ValueError(f"ref_hidden leading dims {list(ref_hidden.shape[:-1])} must equal hidden's "
                         f"{list(hidden.shape[:-1])}")
    if ref_hidden.device != hidden.device:
        raise ValueError(f"ref_hidden is on {ref_hidden.device} but hidden is on {hidden.device}")
    return ref_hidden.reshape(-1, ref_hidden.shape[-1]).detach()


class _OnceOnly(torch.autograd.Function):
    """Identity on a gradient fusedpref computed; differentiating it again raises a clear error."""

    @staticmethod
    def forward(ctx, grad, *anchors):
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError("fusedpref's backward is not differentiable: double backward (a second "
                           "derivative through create_graph=True) is not supported by its fused heads")


def _grads_out(grads, anchors):
    """Wraps the gradients so that a second differentiation (create_graph=True) raises clearly."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return grads
    anchors = [a for a in anchors if isinstance(a, torch.Tensor) and a.requires_grad]
    if not anchors:
        return grads
    return tuple(None if g is None else _OnceOnly.apply(g, *anchors) for g in grads)


def _needs(ctx, bias, idx_bias=3):
    return (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[idx_bias])


def _policy_grads(ctx, dh, dw, db, needs, anchors):
    return _grads_out((dh.view(ctx.hshape) if needs[0] else None, dw if needs[1] else None,
                       db if needs[2] else None), anchors)


class LinearLogProbs(torch.autograd.Function):
    """logp = log_softmax(softcap(hidden @ weight.T + bias))[targets], 0 at ignore_index.

    apply(hidden, weight, targets, bias, ignore_index, softcap, backend, with_stats)
    -> (logp float32 [*targets.shape] (float64 for float64 inputs),
        stats [*targets.shape, 3] or [0]).
    stats (not differentiable, 0 on ignored rows) = (sum of logits over V, entropy, argmax == target).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias=None, ignore_index=-100, softcap=None,
                backend="auto", with_stats=False):
        hidden, weight, bias = _autocast(hidden, weight, bias)
        flat, y, ignore_index, softcap, backend = _check_one(hidden, weight, bias, targets, ignore_index,
                                                             softcap, backend)
        logp, lse, stats = _library.logprob_fwd(flat, weight, y, bias, ignore_index, softcap, backend,
                                                bool(with_stats))
        ctx.hshape, ctx.ignore_index, ctx.softcap, ctx.backend = hidden.shape, ignore_index, softcap, backend
        if any(_needs(ctx, bias)):
            ctx.save_for_backward(flat, weight, bias, y, lse)
        stats = stats.view(*targets.shape, 3) if with_stats else stats
        ctx.mark_non_differentiable(stats)             # the returned tensor itself
        return logp.view(targets.shape), stats

    @staticmethod
    def backward(ctx, grad_logp, _grad_stats):
        flat, weight, bias, y, lse = ctx.saved_tensors
        needs = _needs(ctx, bias)
        dh, dw, db = _library.logprob_bwd(grad_logp.reshape(-1), flat, weight, y, bias, lse, ctx.ignore_index,
                                          ctx.softcap, ctx.backend, *needs)
        dh, dw, db = _policy_grads(ctx, dh, dw, db, needs, (flat, weight, bias))
        return dh, dw, None, db, None, None, None, None


def linear_logprobs(hidden, weight, targets, *, bias=None, ignore_index=-100, softcap=None,
                    backend="auto"):
    """Per-token log-probabilities of a linear LM head without an N x V tensor.

    hidden [..., D] and weight [V, D] of one dtype (float32, float16, bfloat16; float64 on the
    torch backend; under torch.autocast the autocast dtype), bias [V] or None, targets [...]
    integer. Returns float32 (float64 for float64 inputs) of targets' shape, 0.0 where ignore_index.
    """
    logp, _ = LinearLogProbs.apply(hidden, weight, targets, bias, ignore_index, softcap, backend, False)
    return logp


def _kl_forward(ctx, hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, ignore_index, softcap,
                backend, with_logp, with_stats):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias = _autocast(hidden, weight, bias, ref_hidden,
                                                                       ref_weight, ref_bias)
    flat, y, ignore_index, softcap, backend = _check_one(hidden, weight, bias, targets, ignore_index, softcap,
                                                         backend)
    rflat = _check_ref(hidden, weight, ref_hidden, ref_weight, ref_bias)
    rw, rb = ref_weight.detach(), None if ref_bias is None else ref_bias.detach()
    out = _library.kl_fwd(flat, weight, rflat, rw, y, bias, rb, ignore_index, softcap, backend, with_logp,
                          with_stats)
    ctx.hshape, ctx.ignore_index, ctx.softcap, ctx.backend = hidden.shape, ignore_index, softcap, backend
    if any(_needs(ctx, bias, 5)):
        ctx.save_for_backward(flat, weight, bias, rflat, rw, rb, y, out[1], out[2])
    return out


def _kl_backward(ctx, grad_kl, grad_logp):
    flat, weight, bias, rflat, rw, rb, y, lse, rlse = ctx.saved_tensors
    needs = _needs(ctx, bias, 5)
    dh, dw, db = _library.kl_bwd(grad_kl.reshape(-1), None if grad_logp is None else grad_logp.reshape(-1),
                                 flat, weight, rflat, rw, y, bias, rb, lse, rlse, ctx.ignore_index, ctx.softcap,
                                 ctx.backend, *needs)
    return _policy_grads(ctx, dh, dw, db, needs, (flat, weight, bias))


class LinearKL(torch.autograd.Function):
    """Per-token KL(p_ref || p_theta) over the full vocabulary between two linear heads.

    apply(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, ignore_index, softcap,
    backend) -> float32 [*targets.shape]; targets only mark the rows that count (0 elsewhere).
    Gradients flow to the policy (hidden, weight, bias) only.
    """

    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, targets, bias=None, ref_bias=None,
                ignore_index=-100, softcap=None, backend="auto"):
        kl, *_ = _kl_forward(ctx, hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, ignore_index,
                             softcap, backend, False, False)
        return kl.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_kl):
        dh, dw, db = _kl_backward(ctx, grad_kl, None)
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
        kl, _, _, logp, ref_logp, stats = _kl_forward(ctx, hidden, weight, ref_hidden, ref_weight, targets, bias,
                                                      ref_bias, ignore_index, softcap, backend, True,
                                                      bool(with_stats))
        shape = targets.shape
        ref_logp, stats = ref_logp.view(shape), stats.view(*shape, 3) if with_stats else stats
        ctx.mark_non_differentiable(ref_logp, stats)   # the returned tensors themselves
        return logp.view(shape), ref_logp, kl.view(shape), stats

    @staticmethod
    def backward(ctx, grad_logp, _grad_ref, grad_kl, _grad_stats):
        dh, dw, db = _kl_backward(ctx, grad_kl, grad_logp)
        return dh, dw, None, None, None, db, None, None, None, None, None


def linear_logprobs_kl(hidden, weight, ref_hidden, ref_weight, targets, *, bias=None, ref_bias=None,
                       ignore_index=-100, softcap=None, backend="auto"):
    """(logp, ref_logp, kl), each float32 [targets.shape], from one pass over both heads;
    0 where targets == ignore_index. Gradients reach the policy head through logp and kl."""
    logp, ref_logp, kl, _ = LinearLogProbsKL.apply(hidden, weight, ref_hidden, ref_weight, targets, bias,
                                                   ref_bias, ignore_index, softcap, backend, False)
    return logp, ref_logp, kl
