"""torch.autograd.Function per primitive. Backward takes ANY per-token upstream gradient, so
the kernels never know which loss they serve.

Each Function validates its inputs (static checks only: shapes, dtypes, devices), applies
torch.autocast as F.linear would (operands cast to the autocast dtype; the engine returns the
gradients of fp32 master weights in fp32), flattens the rows and calls the custom ops of
fusedpref/_library.py, which hold everything data-dependent. So a step calling them compiles
with torch.compile(fullgraph=True).
"""
from __future__ import annotations

import contextlib

import torch

from . import _library, distributed
from ._checks import (autocast_dtype, check_beta_divergence, check_head, check_ignore_index, check_scale,
                      check_softcap, check_targets, check_temperature, resolve_backend)


_WEIGHT_GATHER = None


def set_weight_gather(fn) -> None:
    """Registers fn(*params) -> context manager that materialises partitioned head weights (DeepSpeed
    ZeRO-3: TRL's maybe_gather_lm_head_ctx) around every backward recompute; None removes it.
    fusedpref.integrations.trl.patch_trl() registers TRL's. The forward runs inside the caller's
    gather (as TRL's fused heads are called)."""
    global _WEIGHT_GATHER
    _WEIGHT_GATHER = fn


FROZEN_PATHS = ("one-pass", "standard")


def frozen_path() -> str:
    """FUSEDPREF_FROZEN: "one-pass" (default) or "standard", the path of a frozen head (hidden
    requires grad, weight and bias do not). one-pass: the forward also accumulates dlogp/dh
    (kernels/frozen.py) and backward is one multiply, 4 N D V FLOPs in all; standard: backward
    recomputes the logits and does dH = dz @ W, 6 N D V (for comparison)."""
    import os

    path = os.environ.get("FUSEDPREF_FROZEN", "one-pass")
    if path not in FROZEN_PATHS:
        raise ValueError(f"FUSEDPREF_FROZEN must be one of {FROZEN_PATHS}, got {path!r}")
    return path


def _gathered(*params):
    return contextlib.nullcontext() if _WEIGHT_GATHER is None else _WEIGHT_GATHER(*params)


def _autocast(*tensors):
    """Under torch.autocast for the tensors' device: floating tensors cast to the autocast dtype."""
    first = next(t for t in tensors if t is not None)
    dt = autocast_dtype(first.device) if isinstance(first, torch.Tensor) else None
    if dt is None:
        return tensors
    return tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def _check_group(process_group, reduce_hidden_grad):
    """process_group: None or a torch.distributed ProcessGroup; reduce_hidden_grad a bool."""
    if process_group is not None:
        import torch.distributed as dist

        if not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got "
                            f"{type(process_group).__name__}")
    if not isinstance(reduce_hidden_grad, bool):
        raise TypeError(f"reduce_hidden_grad must be a bool, got {type(reduce_hidden_grad).__name__}")
    return process_group, reduce_hidden_grad


def _check_one(hidden, weight, bias, targets, ignore_index, softcap, backend, sharded=False):
    """Validates a policy head; (flat hidden [n, D], flat int64 targets, ignore_index, softcap, backend).
    sharded: weight is a vocabulary shard (it may hold no row)."""
    check_head(hidden, weight, bias, allow_empty=sharded)
    y = check_targets(hidden, targets)
    backend = resolve_backend(backend, hidden.device, hidden.dtype)
    return hidden.reshape(-1, hidden.shape[-1]), y, check_ignore_index(ignore_index), check_softcap(softcap), backend


def _check_ref(hidden, weight, ref_hidden, ref_weight, ref_bias, sharded=False):
    """Validates a reference head against the policy head: one vocabulary, same rows."""
    check_head(ref_hidden, ref_weight, ref_bias, names=("ref_hidden", "ref_weight", "ref_bias"), allow_empty=sharded)
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


def _stats_view(stats, shape, with_stats):
    return stats.view(*shape, _library.N_STATS) if with_stats else stats


class LinearLogProbs(torch.autograd.Function):
    """logp = log_softmax(z)[targets], z = softcap(hidden @ weight.T + bias) * logit_scale, 0 at
    ignore_index.

    apply(hidden, weight, targets, bias, ignore_index, softcap, backend, with_stats, logit_scale)
    -> (logp float32 [*targets.shape] (float64 for float64 inputs),
        stats [*targets.shape, 4] or [0]).
    stats (0 on ignored rows) = (sum of logits over V, entropy, argmax == target, log sum_v p^2),
    each with its exact gradient (the argmax hit's is 0): one backward recompute serves the
    log-probs' and the statistics' upstream gradients,
        dz = g_lp (onehot - p) + g_sum - g_H p (log p + H) + 2 g_Q p (p / Q - 1).
    logit_scale (None = 1) multiplies the capped logits: a temperature T is logit_scale = 1 / T.
    process_group (torch.distributed): weight [V_r, D] and bias [V_r] are this rank's vocabulary
    shard, hidden and targets (global ids) the same on every rank (fusedpref/distributed.py);
    the results are the whole vocabulary's on every rank, dH is summed over the group unless
    reduce_hidden_grad=False, dW and db are the shard's.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias=None, ignore_index=-100, softcap=None,
                backend="auto", with_stats=False, logit_scale=None, process_group=None, reduce_hidden_grad=True):
        ctx.set_materialize_grads(False)
        group, ctx.reduce_hidden_grad = _check_group(process_group, reduce_hidden_grad)
        hidden, weight, bias = _autocast(hidden, weight, bias)
        flat, y, ignore_index, softcap, backend = _check_one(hidden, weight, bias, targets, ignore_index,
                                                             softcap, backend, sharded=group is not None)
        scale = check_scale(logit_scale)
        with_stats = bool(with_stats)
        needs = _needs(ctx, bias)
        ctx.frozen = needs[0] and not any(needs[1:]) and frozen_path() == "one-pass"
        direction = None
        ctx.dist = None
        if group is not None:   # vocabulary-parallel: the world's partials merged, per-row results
            logp, lse, stats, direction, ctx.dist = distributed.logprob_fwd(
                flat, weight, y, bias, ignore_index, softcap, scale, backend, with_stats, group, frozen=ctx.frozen)
        elif ctx.frozen:   # the LoRA case: dlogp/dh from the forward's sweep, backward one multiply
            logp, lse, stats, direction = _library.logprob_fwd_frozen(flat, weight, y, bias, ignore_index, softcap,
                                                                      scale, backend, with_stats)
        else:
            logp, lse, stats = _library.logprob_fwd(flat, weight, y, bias, ignore_index, softcap, scale, backend,
                                                    with_stats)
        ctx.hshape, ctx.ignore_index, ctx.softcap, ctx.scale, ctx.backend = (hidden.shape, ignore_index, softcap,
                                                                            scale, backend)
        ctx.with_stats, ctx.hdtype = with_stats, hidden.dtype
        if any(needs):
            ctx.save_for_backward(flat, weight, bias, y, lse, stats if with_stats else None, direction)
        return logp.view(targets.shape), _stats_view(stats, targets.shape, with_stats)

    @staticmethod
    def backward(ctx, grad_logp, grad_stats):
        flat, weight, bias, y, lse, stats, direction = ctx.saved_tensors
        needs = _needs(ctx, bias)
        if grad_logp is None and grad_stats is None:
            return (None,) * 11
        g = torch.zeros_like(lse) if grad_logp is None else grad_logp.reshape(-1)
        gst = None if grad_stats is None or not ctx.with_stats else grad_stats.reshape(-1, _library.N_STATS)
        rest = (None,) * 7
        if ctx.frozen and gst is None:     # dH = g d: no pass over the vocabulary
            dh = g.to(direction.dtype)[:, None] * direction
            if ctx.dist is not None:       # d is this shard's part: the group's sum
                dh = distributed.reduce_direction_grad(ctx.dist, dh, ctx.reduce_hidden_grad)
            dh, _, _ = _policy_grads(ctx, dh.to(ctx.hdtype), None, None, needs, (flat, weight, bias))
            return dh, None, None, None, *rest
        if ctx.dist is not None:
            dh, dw, db = distributed.logprob_bwd(ctx.dist, g, gst, flat, weight, bias, lse, stats, ctx.softcap,
                                                 ctx.scale, ctx.backend, needs, ctx.reduce_hidden_grad)
        else:
            with _gathered(weight, bias):
                dh, dw, db = _library.logprob_bwd(g, gst, flat, weight, y, bias, lse, stats, ctx.ignore_index,
                                                  ctx.softcap, ctx.scale, ctx.backend, *needs)
        dh, dw, db = _policy_grads(ctx, dh, dw, db, needs, (flat, weight, bias))
        return dh, dw, None, db, *rest


def _combined_scale(logit_scale, temperature, name="logit_scale"):
    """One multiplier after the cap from a logit scale and a temperature (None when 1)."""
    s = 1.0 if logit_scale is None else check_scale(logit_scale, name) or 1.0
    return check_scale(s / check_temperature(temperature), name)


def linear_logprobs(hidden, weight, targets, *, bias=None, ignore_index=-100, softcap=None,
                    logit_scale=None, temperature=1.0, backend="auto", process_group=None, reduce_hidden_grad=True):
    """Per-token log-probabilities of a linear LM head without an N x V tensor.

    hidden [..., D] and weight [V, D] of one dtype (float32, float16, bfloat16; float64 on the
    torch backend; under torch.autocast the autocast dtype), bias [V] or None, targets [...]
    integer. Logits: softcap(hidden @ weight.T + bias) * logit_scale / temperature. Returns
    float32 (float64 for float64 inputs) of targets' shape, 0.0 where ignore_index.
    process_group: vocabulary-parallel (weight, bias the rank's shard; README "Distributed");
    DTensor weights are resolved by fusedpref.distributed.resolve.
    """
    hidden, weight, bias, *_, process_group = distributed.resolve_heads(hidden, weight, bias,
                                                                        process_group=process_group)
    logp, _ = LinearLogProbs.apply(hidden, weight, targets, bias, ignore_index, softcap, backend, False,
                                   _combined_scale(logit_scale, temperature), process_group, reduce_hidden_grad)
    return logp


class _Heads:
    """The checked, flattened arguments of a two-head call and its options."""

    def __init__(self, hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, ignore_index, softcap,
                 backend, *, ref_softcap=None, scale=None, ref_scale=None, beta=0.0, process_group=None,
                 reduce_hidden_grad=True):
        self.group, self.reduce_hidden_grad = _check_group(process_group, reduce_hidden_grad)
        sharded = self.group is not None
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias = _autocast(hidden, weight, bias, ref_hidden,
                                                                           ref_weight, ref_bias)
        self.flat, self.y, self.ignore_index, self.softcap, self.backend = _check_one(
            hidden, weight, bias, targets, ignore_index, softcap, backend, sharded)
        self.rflat = _check_ref(hidden, weight, ref_hidden, ref_weight, ref_bias, sharded)
        self.weight, self.bias = weight, bias
        self.rw, self.rb = ref_weight.detach(), None if ref_bias is None else ref_bias.detach()
        self.ref_softcap = check_softcap(ref_softcap, "ref_softcap")
        self.scale, self.ref_scale = check_scale(scale), check_scale(ref_scale, "ref_logit_scale")
        self.beta = check_beta_divergence(beta)
        self.div = 0 if self.beta == 0 else 1 if self.beta == 1 else 2
        self.hshape = hidden.shape


def _kl_forward(ctx, heads: _Heads, with_logp, with_stats):
    """(div, lse, rlse, aux, logp, ref_logp, stats); a frozen policy head with the forward KL takes
    the one-pass path (the directions of dH saved, backward one multiply-add)."""
    ctx.set_materialize_grads(False)
    k = heads
    needs = _needs(ctx, k.bias, 5)
    ctx.frozen = needs[0] and not any(needs[1:]) and k.div == 0 and frozen_path() == "one-pass"
    d_lp = d_kl = None
    ctx.dist, ctx.reduce_hidden_grad = None, k.reduce_hidden_grad
    if k.group is not None:     # vocabulary-parallel (frozen: this shard's parts of the directions)
        *out, ctx.dist = distributed.kl_fwd(
            k.flat, k.weight, k.rflat, k.rw, k.y, k.bias, k.rb, k.ignore_index, k.softcap, k.scale, k.ref_softcap,
            k.ref_scale, k.div, k.beta, k.backend, with_logp, with_stats, k.group, frozen=ctx.frozen)
        if ctx.frozen:
            *out, d_lp, d_kl = out
        out = tuple(out)
    elif ctx.frozen:
        kl, lse, rlse, logp, ref_logp, stats, d_lp, d_kl = _library.kl_fwd_frozen(
            k.flat, k.weight, k.rflat, k.rw, k.y, k.bias, k.rb, k.ignore_index, k.softcap, k.scale, k.ref_softcap,
            k.ref_scale, k.backend, with_logp, with_stats)
        out = (kl, lse, rlse, torch.zeros_like(lse), logp, ref_logp, stats)
    else:
        out = _library.kl_fwd(k.flat, k.weight, k.rflat, k.rw, k.y, k.bias, k.rb, k.ignore_index, k.softcap,
                              k.scale, k.ref_softcap, k.ref_scale, k.div, k.beta, k.backend, with_logp, with_stats)
    ctx.heads_opts = (k.ignore_index, k.softcap, k.scale, k.ref_softcap, k.ref_scale, k.div, k.beta, k.backend)
    ctx.hshape, ctx.with_stats, ctx.hdtype = k.hshape, with_stats, k.flat.dtype
    if any(needs):
        ctx.save_for_backward(k.flat, k.weight, k.bias, k.rflat, k.rw, k.rb, k.y, out[1], out[2], out[3],
                              out[6] if with_stats else None, d_lp if with_logp else None, d_kl)
    return out


def _kl_backward(ctx, grad_div, grad_logp, grad_stats=None):
    flat, weight, bias, rflat, rw, rb, y, lse, rlse, aux, stats, d_lp, d_kl = ctx.saved_tensors
    needs = _needs(ctx, bias, 5)
    if grad_div is None and grad_logp is None and grad_stats is None:
        return None, None, None
    ignore_index, softcap, scale, ref_softcap, ref_scale, div, beta, backend = ctx.heads_opts
    gst = None if grad_stats is None or not ctx.with_stats else grad_stats.reshape(-1, _library.N_STATS)
    if ctx.frozen and gst is None:     # dH = g_kl d_kl + g_lp d_lp: no pass over the vocabulary
        dh = torch.zeros_like(d_kl)
        if grad_div is not None:
            dh += grad_div.reshape(-1, 1).to(dh.dtype) * d_kl
        if grad_logp is not None:
            dh += grad_logp.reshape(-1, 1).to(dh.dtype) * d_lp
        if ctx.dist is not None:           # the directions are this shard's parts: the group's sum
            dh = distributed.reduce_direction_grad(ctx.dist, dh, ctx.reduce_hidden_grad)
        return _policy_grads(ctx, dh.to(ctx.hdtype), None, None, needs, (flat, weight, bias))
    g = torch.zeros_like(lse) if grad_div is None else grad_div.reshape(-1)
    if ctx.dist is not None:
        dh, dw, db = distributed.kl_bwd(ctx.dist, g, None if grad_logp is None else grad_logp.reshape(-1), gst, flat,
                                        weight, rflat, rw, bias, rb, lse, rlse, aux, stats, softcap, scale,
                                        ref_softcap, ref_scale, div, beta, backend, needs, ctx.reduce_hidden_grad)
        return _policy_grads(ctx, dh, dw, db, needs, (flat, weight, bias))
    with _gathered(weight, bias, rw, rb):
        dh, dw, db = _library.kl_bwd(g, None if grad_logp is None else grad_logp.reshape(-1), gst, flat, weight,
                                     rflat, rw, y, bias, rb, lse, rlse, aux, stats, ignore_index, softcap, scale,
                                     ref_softcap, ref_scale, div, beta, backend, *needs)
    return _policy_grads(ctx, dh, dw, db, needs, (flat, weight, bias))


class LinearKL(torch.autograd.Function):
    """Per-token KL(p_ref || p_theta) over the full vocabulary between two linear heads.

    apply(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, ignore_index, softcap,
    backend, process_group, reduce_hidden_grad) -> float32 [*targets.shape]; targets only mark
    the rows that count (0 elsewhere). Gradients flow to the policy (hidden, weight, bias) only.
    LinearDivergence with beta = 0. process_group as LinearLogProbs's (both heads sharded alike).
    """

    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, targets, bias=None, ref_bias=None,
                ignore_index=-100, softcap=None, backend="auto", process_group=None, reduce_hidden_grad=True):
        heads = _Heads(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, ignore_index, softcap,
                       backend, ref_softcap=softcap, process_group=process_group,
                       reduce_hidden_grad=reduce_hidden_grad)
        return _kl_forward(ctx, heads, False, False)[0].view(targets.shape)

    @staticmethod
    def backward(ctx, grad_kl):
        dh, dw, db = _kl_backward(ctx, grad_kl, None)
        return dh, dw, None, None, None, db, None, None, None, None, None, None


def linear_kl(hidden, weight, ref_hidden, ref_weight, targets, *, bias=None, ref_bias=None,
              ignore_index=-100, softcap=None, backend="auto", process_group=None, reduce_hidden_grad=True):
    """Per-token KL(p_ref || p_theta) [targets.shape] float32; 0 where targets == ignore_index.
    process_group: vocabulary-parallel, both heads sharded alike (README "Distributed")."""
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, process_group = distributed.resolve_heads(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, process_group)
    return LinearKL.apply(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, ignore_index,
                          softcap, backend, process_group, reduce_hidden_grad)


class LinearDivergence(torch.autograd.Function):
    """Per-token divergence between the policy (student) head and the reference (teacher) head
    over the full vocabulary, and optionally the policy's statistics, from one pass over both
    heads (the generalised JSD takes two) and one recompute in backward. Gradients flow to the
    policy (hidden, weight, bias) only.

        beta = 0:     KL(p_ref || p)                    (TRL's forward KL; = LinearKL)
        beta = 1:     KL(p || p_ref)                    (reverse KL)
        0 < beta < 1: beta KL(p_ref || m) + (1 - beta) KL(p || m),  m = (1 - beta) p + beta p_ref

    Each head's logits are softcap(h @ W.T + b) * logit_scale with its own cap and scale (a
    temperature T is a scale 1 / T on both). The two heads may differ in hidden size and dtype.

    apply(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, ignore_index, backend,
    beta, softcap, ref_softcap, logit_scale, ref_logit_scale, with_stats, process_group,
    reduce_hidden_grad)
    -> (divergence float32 [*targets.shape], stats [*targets.shape, 4] or [0] as LinearLogProbs's,
        with gradients); targets only mark the rows that count (their values are not read but must
        lie in [0, V)); 0 elsewhere.
    """

    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, targets, bias=None, ref_bias=None,
                ignore_index=-100, backend="auto", beta=0.0, softcap=None, ref_softcap=None, logit_scale=None,
                ref_logit_scale=None, with_stats=False, process_group=None, reduce_hidden_grad=True):
        heads = _Heads(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, ignore_index, softcap,
                       backend, ref_softcap=ref_softcap, scale=logit_scale, ref_scale=ref_logit_scale, beta=beta,
                       process_group=process_group, reduce_hidden_grad=reduce_hidden_grad)
        with_stats = bool(with_stats)
        out = _kl_forward(ctx, heads, with_stats, with_stats)
        return out[0].view(targets.shape), _stats_view(out[6], targets.shape, with_stats)

    @staticmethod
    def backward(ctx, grad_div, grad_stats):
        dh, dw, db = _kl_backward(ctx, grad_div, None, grad_stats)
        return (dh, dw, None, None, None, db) + (None,) * 11


def linear_divergence(hidden, weight, ref_hidden, ref_weight, targets, *, beta=0.0, bias=None, ref_bias=None,
                      ignore_index=-100, softcap=None, ref_softcap=None, logit_scale=None, ref_logit_scale=None,
                      temperature=1.0, backend="auto", process_group=None, reduce_hidden_grad=True):
    """Per-token divergence [targets.shape] float32 between two heads (LinearDivergence; beta 0:
    KL(p_ref || p), 1: KL(p || p_ref), between: the generalised JSD); each head's logits are
    softcap(h @ W.T + b) * logit_scale / temperature. 0 where targets == ignore_index.
    process_group: vocabulary-parallel, both heads sharded alike (README "Distributed")."""
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, process_group = distributed.resolve_heads(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, process_group)
    div, _ = LinearDivergence.apply(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, ignore_index,
                                    backend, beta, softcap, ref_softcap, _combined_scale(logit_scale, temperature),
                                    _combined_scale(ref_logit_scale, temperature, "ref_logit_scale"), False,
                                    process_group, reduce_hidden_grad)
    return div


class LinearLogProbsKL(torch.autograd.Function):
    """The policy's and the reference's per-token log-probs and KL(p_ref || p_theta), all from one
    pass over both heads (EXPO's per-token work; LinearLogProbs + a reference forward + LinearKL
    would read each head three times).

    apply(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, ignore_index, softcap,
    backend, with_stats, process_group, reduce_hidden_grad) -> (logp, ref_logp, kl) float32
    [*targets.shape] and stats as in
    LinearLogProbs; 0 where ignore_index. Gradients flow to the policy (hidden, weight, bias) from
    logp, kl and stats, through one backward pass: dz = g_lp (onehot - p) + g_kl (p - p_ref) + ...
    ref_logp is not differentiable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, targets, bias=None, ref_bias=None,
                ignore_index=-100, softcap=None, backend="auto", with_stats=False, process_group=None,
                reduce_hidden_grad=True):
        heads = _Heads(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, ignore_index, softcap,
                       backend, ref_softcap=softcap, process_group=process_group,
                       reduce_hidden_grad=reduce_hidden_grad)
        with_stats = bool(with_stats)
        kl, _, _, _, logp, ref_logp, stats = _kl_forward(ctx, heads, True, with_stats)
        shape = targets.shape
        ref_logp = ref_logp.view(shape)
        ctx.mark_non_differentiable(ref_logp)   # the returned tensor itself
        return logp.view(shape), ref_logp, kl.view(shape), _stats_view(stats, shape, with_stats)

    @staticmethod
    def backward(ctx, grad_logp, _grad_ref, grad_kl, grad_stats):
        dh, dw, db = _kl_backward(ctx, grad_kl, grad_logp, grad_stats)
        return dh, dw, None, None, None, db, None, None, None, None, None, None, None


def linear_logprobs_kl(hidden, weight, ref_hidden, ref_weight, targets, *, bias=None, ref_bias=None,
                       ignore_index=-100, softcap=None, backend="auto", process_group=None, reduce_hidden_grad=True):
    """(logp, ref_logp, kl), each float32 [targets.shape], from one pass over both heads;
    0 where targets == ignore_index. Gradients reach the policy head through logp and kl.
    process_group: vocabulary-parallel, both heads sharded alike (README "Distributed")."""
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, process_group = distributed.resolve_heads(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, process_group)
    logp, ref_logp, kl, _ = LinearLogProbsKL.apply(hidden, weight, ref_hidden, ref_weight, targets, bias,
                                                   ref_bias, ignore_index, softcap, backend, False, process_group,
                                                   reduce_hidden_grad)
    return logp, ref_logp, kl
