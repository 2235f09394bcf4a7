"""The autograd layer: one torch.autograd.Function behind every fused head call, and the public
head entry points on top of it.

`run(call, targets, policy, ref)` is the only way in: it checks the heads once (static checks:
shapes, dtypes, devices), applies torch.autocast as F.linear would (operands cast to the autocast
dtype; the engine returns the gradients of fp32 master weights in fp32), flattens the rows and
applies `HeadFunction`, whose forward and backward are the custom ops of fusedpref/_library.py
(everything data-dependent happens there, so a step calling them compiles with
torch.compile(fullgraph=True)). Backward takes ANY per-token upstream gradient, so the kernels
never know which loss they serve.

The public Functions (`LinearLogProbs`, `LinearKL`, `LinearLogProbsKL`, `LinearDivergence`) are
thin: their `apply` builds a `HeadCall` (fusedpref/_spec.py) from its documented arguments and
calls `run`; the functional forms (`linear_logprobs`, ...) also resolve DTensor heads
(fusedpref/_dtensor.py) and take the full option set.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from dataclasses import replace
from typing import Literal, NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import _dtensor, _library
from ._checks import (autocast_dtype, check_head, check_ignore_index, check_mix, check_scale, check_softcap,
                      check_targets, check_temperature, resolve_backend)
from ._spec import FROZEN_MODES, Backend, Divergence, FrozenMode, Head, HeadCall, Needs, Transform
from .distributed import group_name

Same = Literal["same"]


# ---------------------------------------------------------------- ZeRO-3 weight gathering

_WEIGHT_GATHER = None


def set_weight_gather(fn) -> None:
    """Registers fn(*params) -> context manager that materialises partitioned head weights (DeepSpeed
    ZeRO-3: TRL's maybe_gather_lm_head_ctx) around every backward recompute; None removes it.
    fusedpref.integrations.trl.patch_trl() registers TRL's. The forward runs inside the caller's
    gather (as TRL's fused heads are called)."""
    global _WEIGHT_GATHER
    _WEIGHT_GATHER = fn


def gathered(*params):
    """The registered weight gather around params (a no-op context without one)."""
    return contextlib.nullcontext() if _WEIGHT_GATHER is None else _WEIGHT_GATHER(*params)


# ---------------------------------------------------------------- the one autograd Function

class HeadTensors(NamedTuple):
    """One head's tensors as the user passes them: hidden [..., D], weight [V, D], bias [V] or None."""
    hidden: Tensor
    weight: Tensor
    bias: Optional[Tensor] = None


class HeadResult(NamedTuple):
    """The outputs of a head call, shaped like its targets (empty where not asked for): the
    policy's and the reference's target log-probs, the divergence, the policy's statistics
    [..., 4]; vocab, the whole vocabulary's size (an int, or a 0-dim tensor under a process group)."""
    logp: Tensor
    ref_logp: Tensor
    div: Tensor
    stats: Tensor
    vocab: Union[int, Tensor]


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
    anchors = [a for a in anchors if isinstance(a, Tensor) and a.requires_grad]
    if not anchors:
        return grads
    return tuple(None if g is None else _OnceOnly.apply(g, *anchors) for g in grads)


class HeadFunction(torch.autograd.Function):
    """The autograd Function of every fused head call.

    apply(call: HeadCall, hidden [n, D], weight [V, D], bias, ref_hidden [n, D'] or None, ref_weight,
    ref_bias, targets [n] int64) -> (logp, ref_logp, div [n], stats [n, 4], shards [world]), each
    empty where the call does not ask for it. Gradients flow to the policy (hidden, weight, bias)
    only; ref_logp and shards are not differentiable. A frozen policy head (hidden requires grad,
    weight and bias do not) takes the one-pass path unless call.frozen says otherwise."""

    @staticmethod
    def forward(ctx, call: HeadCall, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets):
        ctx.set_materialize_grads(False)
        grad = ctx.needs_input_grad
        needs = Needs(grad[1], grad[2], bias is not None and grad[3])
        call = call.resolve_frozen(needs.h and not needs.w and not needs.b)
        out = _library.run_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, *call.op_args())
        ctx.call, ctx.needs = call, needs
        if any(needs):
            ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, out.lse, out.rlse,
                                  out.aux, out.stats, out.d_lp, out.d_kl, out.shards)
        ctx.mark_non_differentiable(out.ref_logp, out.shards)
        return out.logp, out.ref_logp, out.div, out.stats, out.shards

    @staticmethod
    def backward(ctx, grad_logp, _grad_ref, grad_div, grad_stats, _grad_shards):
        call, needs = ctx.call, ctx.needs
        if not call.stats:
            grad_stats = None
        if grad_logp is None and grad_div is None and grad_stats is None:
            return (None,) * 8
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, *saved = ctx.saved_tensors
        # the one-pass frozen path reads no weight in backward; the recompute does (gathered)
        reads_weights = not (call.one_pass and grad_stats is None)
        with gathered(weight, bias, ref_weight, ref_bias) if reads_weights else contextlib.nullcontext():
            dh, dw, db = _library.run_backward(grad_logp, grad_div, grad_stats, hidden, weight, bias, ref_hidden,
                                               ref_weight, ref_bias, targets, *saved, *needs, *call.op_args())
        dh, dw, db = _grads_out((dh if needs.h else None, dw if needs.w else None, db if needs.b else None),
                                (hidden, weight, bias))
        return None, dh, dw, db, None, None, None, None


def _autocast(*heads: Optional[HeadTensors]):
    """Under torch.autocast for the tensors' device: floating tensors cast to the autocast dtype
    (float64 stays), as F.linear's operands would be."""
    device = heads[0].hidden.device if isinstance(heads[0].hidden, Tensor) else None
    dt = None if device is None else autocast_dtype(device)
    if dt is None:
        return heads
    cast = lambda t: t.to(dt) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 \
        else t  # noqa: E731
    return tuple(None if head is None else HeadTensors(*(cast(t) for t in head)) for head in heads)


POLICY_NAMES = ("hidden", "weight", "bias")
REF_NAMES = ("ref_hidden", "ref_weight", "ref_bias")


def check_pair(policy: HeadTensors, ref: HeadTensors, sharded: bool = False) -> None:
    """A reference head against the policy head: valid on its own, one vocabulary, the same rows."""
    check_head(*ref, names=REF_NAMES, allow_empty=sharded)
    if ref.weight.shape[0] != policy.weight.shape[0]:
        raise ValueError(f"ref_weight has V={ref.weight.shape[0]} but weight has V={policy.weight.shape[0]}: "
                         "the two heads must share the vocabulary")
    if tuple(ref.hidden.shape[:-1]) != tuple(policy.hidden.shape[:-1]):
        raise ValueError(f"ref_hidden leading dims {list(ref.hidden.shape[:-1])} must equal hidden's "
                         f"{list(policy.hidden.shape[:-1])}")
    if ref.hidden.device != policy.hidden.device:
        raise ValueError(f"ref_hidden is on {ref.hidden.device} but hidden is on {policy.hidden.device}")


def run(call: HeadCall, targets: Tensor, policy: HeadTensors, ref: Optional[HeadTensors] = None,
        names=POLICY_NAMES) -> HeadResult:
    """One fused head call: the heads checked once (names: the policy head's argument names),
    autocast applied, the rows flattened, HeadFunction applied; results shaped like targets."""
    sharded = call.group is not None
    if not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None:
        raise RuntimeError("fusedpref's fused heads do not run under torch.func transforms (vmap, grad, jacrev, "
                           "jvp, functional_call's grad, ...): their forward and backward are fused kernels with "
                           "no batching or forward-mode rule. Call them outside the transform (batch the rows "
                           "instead of vmap; use torch.autograd.grad / .backward() for gradients)")
    policy, ref = _autocast(policy, ref)
    check_head(*policy, names=names, allow_empty=sharded)
    y = check_targets(policy.hidden, targets, names=(names[0], "targets"))
    if (ref is None) == call.two_heads:
        raise ValueError("a two-head call needs ref_hidden/ref_weight, a one-head call none")
    if ref is not None:
        check_pair(policy, ref, sharded)
        ref = HeadTensors(*(None if t is None else t.detach() for t in ref))
    call = resolve(call, policy.hidden)
    hidden = policy.hidden.reshape(-1, policy.hidden.shape[-1])
    rh, rw, rb = (None, None, None) if ref is None else (ref.hidden.reshape(-1, ref.hidden.shape[-1]), ref.weight,
                                                         ref.bias)
    logp, ref_logp, div, stats, shards = HeadFunction.apply(call, hidden, policy.weight, policy.bias, rh, rw, rb, y)
    shape = targets.shape
    if call.logp:
        logp = logp.view(shape)
    if call.two_heads:
        div = div.view(shape)
        if call.logp:
            ref_logp = ref_logp.view(shape)
    if call.stats:
        stats = stats.view(*shape, _library.N_STATS)
    return HeadResult(logp, ref_logp, div, stats, shards.sum() if sharded else policy.weight.shape[0])


# ---------------------------------------------------------------- building a call from the user's options

def transform(softcap=None, logit_scale=None, temperature=1.0, names=("softcap", "logit_scale")) -> Transform:
    """A head's checked logit transform: the cap, then one multiplier logit_scale / temperature."""
    cap = check_softcap(softcap, names[0])
    s = 1.0 if logit_scale is None else check_scale(logit_scale, names[1]) or 1.0
    return Transform(cap, check_scale(s / check_temperature(temperature), names[1]))


def ref_transform(ref_softcap, ref_logit_scale, softcap, logit_scale, temperature=1.0) -> Transform:
    """The reference head's transform; "same" (the default of the preference losses and the KL
    primitives) takes the policy's cap or scale."""
    return transform(softcap if isinstance(ref_softcap, str) and ref_softcap == "same" else ref_softcap,
                     logit_scale if isinstance(ref_logit_scale, str) and ref_logit_scale == "same"
                     else ref_logit_scale, temperature, ("ref_softcap", "ref_logit_scale"))


def _check_bool(name, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def make_call(policy: Transform, *, ref: Optional[Transform] = None, divergence=Divergence.FORWARD_KL, mix=0.0,
              ignore_index=-100, backend="auto", logp=True, stats=False, frozen="auto", process_group=None,
              reduce_hidden_grad=True, grad_filter=None) -> HeadCall:
    """A HeadCall from checked user options (the backend and grad_filter="auto" are resolved in run,
    against the device and the operand dtype)."""
    if frozen not in FROZEN_MODES:
        raise ValueError(f"frozen must be one of {FROZEN_MODES}, got {frozen!r}")
    if not isinstance(backend, str) or backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be one of ('auto', 'triton', 'torch'), got {backend!r}")
    return HeadCall(policy, ref, Divergence(divergence), float(mix), check_ignore_index(ignore_index), backend,
                    bool(logp), bool(stats), frozen, False, group_name(process_group),
                    _check_bool("reduce_hidden_grad", reduce_hidden_grad), check_grad_filter(grad_filter))


AUTO_FILTER = -1.0   # HeadCall.grad_filter before it is resolved: "auto"


def check_grad_filter(value) -> float:
    """grad_filter: None (exact) -> 0, "auto" -> AUTO_FILTER, a positive finite float -> itself."""
    if value is None:
        return 0.0
    if isinstance(value, str) and value == "auto":
        return AUTO_FILTER
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or not value > 0:
        raise ValueError(f"grad_filter must be None (exact), 'auto' (the operand dtype's eps / 32) or a positive "
                         f"finite float, got {value!r}")
    return float(value)


def resolve(call: HeadCall, hidden: Tensor) -> HeadCall:
    """The call's backend against the device and its grad_filter against the operand dtype
    (after autocast): "auto" is the dtype's eps / 32, as Cut Cross-Entropy's."""
    call = replace(call, backend=resolve_backend(call.backend, hidden.device, hidden.dtype))
    if call.grad_filter == AUTO_FILTER:
        call = replace(call, grad_filter=torch.finfo(hidden.dtype).eps / 32)
    if call.grad_filter > 0 and call.backend != "torch":
        raise ValueError("grad_filter runs on the torch backend only for now (backend='torch'); the Triton "
                         "kernels do not skip blocks yet")
    return call


def _divergence(mix: float) -> Divergence:
    return Divergence.FORWARD_KL if mix == 0 else Divergence.REVERSE_KL if mix == 1 else Divergence.JSD


# ---------------------------------------------------------------- the public Functions

class LinearLogProbs:
    """logp = log_softmax(z)[targets], z = softcap(hidden @ weight.T + bias) * logit_scale, 0 at
    ignore_index.

    apply(hidden, weight, targets, bias, ignore_index, softcap, backend, with_stats, logit_scale,
    process_group, reduce_hidden_grad)
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
    def apply(hidden, weight, targets, bias=None, ignore_index=-100, softcap=None, backend="auto", with_stats=False,
              logit_scale=None, process_group=None, reduce_hidden_grad=True, *, frozen="auto"):
        call = make_call(transform(softcap, logit_scale), ignore_index=ignore_index, backend=backend,
                         stats=bool(with_stats), frozen=frozen, process_group=process_group,
                         reduce_hidden_grad=reduce_hidden_grad)
        out = run(call, targets, HeadTensors(hidden, weight, bias))
        return out.logp, out.stats


class LinearKL:
    """Per-token KL(p_ref || p_theta) over the full vocabulary between two linear heads (one
    soft-cap for both).

    apply(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, ignore_index, softcap,
    backend, process_group, reduce_hidden_grad) -> float32 [*targets.shape]; targets only mark
    the rows that count (0 elsewhere). Gradients flow to the policy (hidden, weight, bias) only.
    LinearDivergence with beta = 0. process_group as LinearLogProbs's (both heads sharded alike).
    """

    @staticmethod
    def apply(hidden, weight, ref_hidden, ref_weight, targets, bias=None, ref_bias=None, ignore_index=-100,
              softcap=None, backend="auto", process_group=None, reduce_hidden_grad=True, *, frozen="auto"):
        xf = transform(softcap)
        call = make_call(xf, ref=xf, ignore_index=ignore_index, backend=backend, logp=False, frozen=frozen,
                         process_group=process_group, reduce_hidden_grad=reduce_hidden_grad)
        return run(call, targets, HeadTensors(hidden, weight, bias), HeadTensors(ref_hidden, ref_weight, ref_bias)).div


class LinearDivergence:
    """Per-token divergence between the policy (student) head and the reference (teacher) head
    over the full vocabulary, and optionally the policy's statistics, from one pass over both
    heads (the generalised JSD takes two) and one recompute in backward. Gradients flow to the
    policy (hidden, weight, bias) only.

        beta = 0:     KL(p_ref || p)                    (TRL's forward KL; = LinearKL)
        beta = 1:     KL(p || p_ref)                    (reverse KL)
        0 < beta < 1: beta KL(p_ref || m) + (1 - beta) KL(p || m),  m = (1 - beta) p + beta p_ref

    (beta is the mixture weight, `mix` in linear_divergence.) Each head's logits are
    softcap(h @ W.T + b) * logit_scale with its own cap and scale (a temperature T is a scale
    1 / T on both). The two heads may differ in hidden size and dtype.

    apply(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, ignore_index, backend,
    beta, softcap, ref_softcap, logit_scale, ref_logit_scale, with_stats, process_group,
    reduce_hidden_grad)
    -> (divergence float32 [*targets.shape], stats [*targets.shape, 4] or [0] as LinearLogProbs's,
        with gradients); targets only mark the rows that count (their values are not read but must
        lie in [0, V)); 0 elsewhere.
    """

    @staticmethod
    def apply(hidden, weight, ref_hidden, ref_weight, targets, bias=None, ref_bias=None, ignore_index=-100,
              backend="auto", beta=0.0, softcap=None, ref_softcap=None, logit_scale=None, ref_logit_scale=None,
              with_stats=False, process_group=None, reduce_hidden_grad=True, *, frozen="auto"):
        mix = check_mix(beta, "beta")
        with_stats = bool(with_stats)
        call = make_call(transform(softcap, logit_scale),
                         ref=transform(ref_softcap, ref_logit_scale, names=("ref_softcap", "ref_logit_scale")),
                         divergence=_divergence(mix), mix=mix, ignore_index=ignore_index, backend=backend,
                         logp=with_stats, stats=with_stats, frozen=frozen, process_group=process_group,
                         reduce_hidden_grad=reduce_hidden_grad)
        out = run(call, targets, HeadTensors(hidden, weight, bias), HeadTensors(ref_hidden, ref_weight, ref_bias))
        return out.div, out.stats


class LinearLogProbsKL:
    """The policy's and the reference's per-token log-probs and KL(p_ref || p_theta), all from one
    pass over both heads (EXPO's per-token work; LinearLogProbs + a reference forward + LinearKL
    would read each head three times).

    apply(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, ignore_index, softcap,
    backend, with_stats, process_group, reduce_hidden_grad) -> (logp, ref_logp, kl) float32
    [*targets.shape] and stats as in LinearLogProbs; 0 where ignore_index. Gradients flow to the
    policy (hidden, weight, bias) from logp, kl and stats, through one backward pass:
    dz = g_lp (onehot - p) + g_kl (p - p_ref) + ...; ref_logp is not differentiable.
    """

    @staticmethod
    def apply(hidden, weight, ref_hidden, ref_weight, targets, bias=None, ref_bias=None, ignore_index=-100,
              softcap=None, backend="auto", with_stats=False, process_group=None, reduce_hidden_grad=True, *,
              frozen="auto"):
        xf = transform(softcap)
        call = make_call(xf, ref=xf, ignore_index=ignore_index, backend=backend, stats=bool(with_stats),
                         frozen=frozen, process_group=process_group, reduce_hidden_grad=reduce_hidden_grad)
        out = run(call, targets, HeadTensors(hidden, weight, bias), HeadTensors(ref_hidden, ref_weight, ref_bias))
        return out.logp, out.ref_logp, out.div, out.stats


# ---------------------------------------------------------------- the functional forms

def linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Optional[Tensor] = None,
                    ignore_index: int = -100, softcap: Optional[float] = None, logit_scale: Optional[float] = None,
                    temperature: float = 1.0, backend: Backend = "auto", frozen: FrozenMode = "auto",
                    process_group=None, reduce_hidden_grad: bool = True) -> Tensor:
    """Per-token log-probabilities of a linear LM head without an N x V tensor.

    hidden [..., D] and weight [V, D] of one dtype (float32, float16, bfloat16; float64 on the
    torch backend; under torch.autocast the autocast dtype), bias [V] or None, targets [...]
    integer. Logits: softcap(hidden @ weight.T + bias) * logit_scale / temperature. Returns
    float32 (float64 for float64 inputs) of targets' shape, 0.0 where ignore_index.
    frozen: the path of a frozen head ("auto": the one-pass path when only hidden requires grad).
    process_group: vocabulary-parallel (weight, bias the rank's shard; README "Distributed");
    DTensor weights are resolved by fusedpref._dtensor.resolve.
    """
    hidden, weight, bias, *_, process_group = _dtensor.resolve_heads(hidden, weight, bias,
                                                                     process_group=process_group)
    call = make_call(transform(softcap, logit_scale, temperature), ignore_index=ignore_index, backend=backend,
                     frozen=frozen, process_group=process_group, reduce_hidden_grad=reduce_hidden_grad)
    return run(call, targets, HeadTensors(hidden, weight, bias)).logp


def _two_head_call(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, process_group):
    """DTensor heads resolved: (policy HeadTensors, ref HeadTensors, process_group)."""
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, process_group = _dtensor.resolve_heads(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, process_group)
    return HeadTensors(hidden, weight, bias), HeadTensors(ref_hidden, ref_weight, ref_bias), process_group


def _kl_call(transforms, **options) -> HeadCall:
    """The forward-KL call of the two-head functions: transforms = (softcap, logit_scale, ref_softcap,
    ref_logit_scale, temperature), the reference's "same" meaning the policy's."""
    softcap, logit_scale, ref_softcap, ref_logit_scale, temperature = transforms
    return make_call(transform(softcap, logit_scale, temperature),
                     ref=ref_transform(ref_softcap, ref_logit_scale, softcap, logit_scale, temperature), **options)


def linear_kl(hidden: Tensor, weight: Tensor, ref_hidden: Tensor, ref_weight: Tensor, targets: Tensor, *,
              bias: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None, ignore_index: int = -100,
              softcap: Optional[float] = None, ref_softcap: Union[float, None, Same] = "same",
              logit_scale: Optional[float] = None, ref_logit_scale: Union[float, None, Same] = "same",
              temperature: float = 1.0, backend: Backend = "auto", frozen: FrozenMode = "auto",
              process_group=None, reduce_hidden_grad: bool = True) -> Tensor:
    """Per-token KL(p_ref || p_theta) [targets.shape] float32; 0 where targets == ignore_index.
    The reference head's cap and scale default to the policy's ("same").
    process_group: vocabulary-parallel, both heads sharded alike (README "Distributed")."""
    policy, ref, process_group = _two_head_call(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, process_group)
    call = _kl_call((softcap, logit_scale, ref_softcap, ref_logit_scale, temperature), ignore_index=ignore_index,
                    backend=backend, logp=False, frozen=frozen, process_group=process_group,
                    reduce_hidden_grad=reduce_hidden_grad)
    return run(call, targets, policy, ref).div


def linear_logprobs_kl(hidden: Tensor, weight: Tensor, ref_hidden: Tensor, ref_weight: Tensor, targets: Tensor, *,
                       bias: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None, ignore_index: int = -100,
                       softcap: Optional[float] = None, ref_softcap: Union[float, None, Same] = "same",
                       logit_scale: Optional[float] = None, ref_logit_scale: Union[float, None, Same] = "same",
                       temperature: float = 1.0, backend: Backend = "auto", frozen: FrozenMode = "auto",
                       process_group=None, reduce_hidden_grad: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, ref_logp, kl), each float32 [targets.shape], from one pass over both heads;
    0 where targets == ignore_index. Gradients reach the policy head through logp and kl.
    The reference head's cap and scale default to the policy's ("same").
    process_group: vocabulary-parallel, both heads sharded alike (README "Distributed")."""
    policy, ref, process_group = _two_head_call(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, process_group)
    call = _kl_call((softcap, logit_scale, ref_softcap, ref_logit_scale, temperature), ignore_index=ignore_index,
                    backend=backend, frozen=frozen, process_group=process_group, reduce_hidden_grad=reduce_hidden_grad)
    out = run(call, targets, policy, ref)
    return out.logp, out.ref_logp, out.div


_NO_MIX = object()


def linear_divergence(hidden: Tensor, weight: Tensor, ref_hidden: Tensor, ref_weight: Tensor, targets: Tensor, *,
                      mix: float = 0.0, bias: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
                      ignore_index: int = -100, softcap: Optional[float] = None, ref_softcap: Optional[float] = None,
                      logit_scale: Optional[float] = None, ref_logit_scale: Optional[float] = None,
                      temperature: float = 1.0, backend: Backend = "auto", process_group=None,
                      reduce_hidden_grad: bool = True, beta=_NO_MIX) -> Tensor:
    """Per-token divergence [targets.shape] float32 between two heads (LinearDivergence): mix 0
    KL(p_ref || p), 1 KL(p || p_ref), between the generalised JSD with the mixture
    m = (1 - mix) p + mix p_ref. Each head's logits are softcap(h @ W.T + b) * logit_scale /
    temperature with its own cap and scale (the teacher's default to none). 0 where targets ==
    ignore_index. beta is the deprecated name of mix.
    process_group: vocabulary-parallel, both heads sharded alike (README "Distributed")."""
    if beta is not _NO_MIX:
        warnings.warn("linear_divergence(beta=...) is deprecated: the mixture weight is now called mix "
                      "(beta is the loss strength everywhere else in fusedpref)", FutureWarning, stacklevel=2)
        if mix != 0.0:
            raise TypeError("pass the mixture weight once: mix= (beta= is its deprecated name)")
        mix = check_mix(beta, "beta")
    mix = check_mix(mix, "mix")
    policy, ref, process_group = _two_head_call(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, process_group)
    call = make_call(transform(softcap, logit_scale, temperature),
                     ref=transform(ref_softcap, ref_logit_scale, temperature, ("ref_softcap", "ref_logit_scale")),
                     divergence=_divergence(mix), mix=mix, ignore_index=ignore_index, backend=backend, logp=False,
                     process_group=process_group, reduce_hidden_grad=reduce_hidden_grad)
    return run(call, targets, policy, ref).div



# ---------------------------------------------------------------- gradients in forward

class LossPlan(NamedTuple):
    """A loss computed with its gradient inside the fused pass (fusedpref/api.py builds it):
    call the head call (stats on; two heads for EXPO's exact KL), layout how rows group into
    sequences and units (_spec.LossRows), unit_grads(units, SeqSums) -> (dL/dlogp [S], dL/dKL [S]
    or None) of those units' terms with the reduction's weight, total(SeqSums) -> the loss value
    (the same [B]-sized maths as the recompute path), budget the kept buffers' bytes."""
    call: HeadCall
    layout: object
    unit_grads: object
    total: object
    budget: int


class FusedLossFunction(torch.autograd.Function):
    """The loss and its gradients in one pass (README "Gradients in forward"): forward computes the
    loss, the sequences' log-probs (and the reference's and the KL) and the statistics, and dH, dW,
    db of the loss; backward scales them by the upstream gradient, in place, and hands them over
    (no second copy of dW: the engine takes the tensor as the gradient). A later backward through
    the same graph (retain_graph=True) runs the fused pass again for its gradients. The
    per-sequence outputs and statistics are not differentiable (they feed the metrics)."""

    @staticmethod
    def _pass(plan, needs, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets):
        pol = Head(hidden, weight, bias, plan.call.policy)
        ref = None if ref_hidden is None else Head(ref_hidden, ref_weight, ref_bias, plan.call.ref)
        with torch.no_grad():
            return _library.fused_loss(plan.call, pol, ref, targets, plan.layout, plan.unit_grads, plan.budget, needs)

    @staticmethod
    def forward(ctx, plan: LossPlan, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets):
        grad = ctx.needs_input_grad
        needs = Needs(grad[1], grad[2], bias is not None and grad[3])
        sums, stats, dh, dw, db = FusedLossFunction._pass(plan, needs, hidden, weight, bias, ref_hidden, ref_weight,
                                                          ref_bias, targets)
        with torch.no_grad():
            loss = plan.total(sums)
        logp_seq, ref_seq, kl_seq = sums.logp, sums.ref_logp, sums.kl
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets)
        ctx.plan, ctx.needs, ctx.grads = plan, needs, [dh, dw, db]
        empty = logp_seq.new_empty(0)
        outs = (logp_seq, empty if ref_seq is None else ref_seq, empty.clone() if kl_seq is None else kl_seq, stats)
        ctx.mark_non_differentiable(*outs)
        return (loss, *outs)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if grad_loss is None:
            return (None,) * 8
        inputs = ctx.saved_tensors
        if ctx.grads is None:           # a second backward (retain_graph=True): the pass again
            ctx.grads = list(FusedLossFunction._pass(ctx.plan, ctx.needs, *inputs)[-3:])
        grads, ctx.grads = ctx.grads, None
        grads = tuple(None if t is None or not need else t.mul_(grad_loss.to(t.dtype))
                      for t, need in zip(grads, ctx.needs))
        # a second derivative (create_graph=True) raises clearly, as the per-token heads'
        return (None, *_grads_out(grads, inputs[:3]), None, None, None, None)


def run_loss(plan: LossPlan, targets: Tensor, policy: HeadTensors, ref: Optional[HeadTensors] = None):
    """FusedLossFunction on checked, autocast, flattened heads: (loss, logp_seq, ref_seq, kl_seq,
    stats [*targets.shape, 4]); as run() for the checks."""
    if not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None:
        raise RuntimeError("fusedpref's fused heads do not run under torch.func transforms")
    policy, ref = _autocast(policy, ref)
    check_head(*policy)
    y = check_targets(policy.hidden, targets)
    if ref is not None:
        check_pair(policy, ref)
        ref = HeadTensors(*(None if t is None else t.detach() for t in ref))
    call = resolve(plan.call, policy.hidden)
    plan = plan._replace(call=call)
    hidden = policy.hidden.reshape(-1, policy.hidden.shape[-1])
    rh, rw, rb = (None, None, None) if ref is None else (ref.hidden.reshape(-1, ref.hidden.shape[-1]), ref.weight,
                                                         ref.bias)
    loss, logp_seq, ref_seq, kl_seq, stats = FusedLossFunction.apply(plan, hidden, policy.weight, policy.bias, rh, rw,
                                                                     rb, y)
    return loss, logp_seq, (ref_seq if ref is not None else None), (kl_seq if ref is not None else None), \
        stats.view(*targets.shape, _library.N_STATS)
