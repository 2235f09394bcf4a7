"""preference_loss(...): fused LM head -> per-token log-probs -> sequence sums -> loss + metrics.

Batch convention (TRL's and Liger's): hidden [2B, T, D], targets [2B, T]; rows 0..B-1 are the
chosen sequences, rows B..2B-1 the rejected ones; positions equal to ignore_index (prompt,
padding) are skipped.

Everything here is [B]-sized loss maths on top of fusedpref.functions.run, which checks each
head call's tensors once; this module checks only what is its own (the batch layout, the loss
options, which reference is given).
"""
from __future__ import annotations

import math
import warnings
from typing import Literal, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from . import _dtensor
from ._checks import BACKENDS, check_ignore_index, check_softcap, resolve_backend
from ._spec import Backend, FrozenMode, LossRows, SeqSums
from .config import kept_bytes
from .functions import REF_NAMES, HeadTensors, LossPlan, Same, check_grad_filter, check_pair, make_call, \
    ref_transform, run, run_loss, transform
from .losses import LOSSES, NLL_LOSSES, Pairs, check_loss_args, is_real

Reduction = Literal["mean", "sum", "none"]
REDUCTIONS = ("mean", "sum", "none")


class _Heads:
    """The head options of one loss call (transforms, ignore_index, backend, frozen mode, group),
    checked once; `call(...)` makes the HeadCall of each head call the loss makes."""

    def __init__(self, opts: dict, process_group):
        self.policy = transform(opts["softcap"], opts["logit_scale"], opts["temperature"])
        self.ref = ref_transform(opts["ref_softcap"], opts["ref_logit_scale"], opts["softcap"], opts["logit_scale"],
                                 opts["temperature"])
        self.ignore_index = check_ignore_index(opts["ignore_index"])
        self.backend, self.frozen = opts["backend"], opts["frozen"]
        self.group, self.reduce_hidden_grad = process_group, opts["reduce_hidden_grad"]
        self.grad_filter = opts.get("grad_filter")
        check_grad_filter(self.grad_filter)           # (the policy head's calls take it)

    def call(self, *, head="policy", two_heads=False, stats=False):
        """The HeadCall of the policy head (with two_heads: policy and reference in one pass) or of
        the reference head alone."""
        xf = self.ref if head == "ref" else self.policy
        policy = head == "policy"
        return make_call(xf, ref=self.ref if two_heads else None, ignore_index=self.ignore_index,
                         backend=self.backend, stats=stats, frozen=self.frozen if policy else "auto",
                         process_group=self.group, reduce_hidden_grad=self.reduce_hidden_grad,
                         grad_filter=self.grad_filter if policy else None)

    def sequence_logps(self, targets, policy: HeadTensors, stats=False):
        """(sequence log-probs [rows], per-token statistics [rows, T, 4] or [0], the vocabulary)."""
        out = run(self.call(stats=stats), targets, policy)
        return out.logp.sum(-1), out.stats, out.vocab

    def reference_logps(self, targets, ref: HeadTensors, token_weight=None):
        """Sequence log-probs of the reference head (each token's times token_weight [rows, T] if
        given), forward only: no graph, nothing saved."""
        with torch.no_grad():
            ref = HeadTensors(*(None if t is None else t.detach() for t in ref))
            logp = run(self.call(head="ref"), targets, ref, names=REF_NAMES).logp
            return _weighted_sum(logp, token_weight)


def _weighted_sum(logp, token_weight):
    """Per-sequence sums of per-token log-probs [rows, T], each times token_weight if given."""
    return logp.sum(-1) if token_weight is None else (logp * token_weight.to(logp.dtype)).sum(-1)


def _ld_weights(mask, b, ld_alpha):
    """LD-DPO's token weights [2B, T] (Liu et al. 2024, as TRL's ld_alpha): 1 on each pair's first
    min(chosen, rejected) completion tokens, ld_alpha on the longer sequence's tail, 0 elsewhere."""
    pos = mask.cumsum(-1)
    lengths = mask.sum(-1)
    shared = torch.minimum(lengths[:b], lengths[b:]).repeat(2)
    return torch.where(pos <= shared[:, None], 1.0, float(ld_alpha)) * mask


def _wpo_weights(raw_logps, log_sum_sq, lengths, b):
    """WPO's pair weights [B] (Zhou et al. 2024, Eq. 2, as TRL's use_weighting): each sequence's
    exp(mean over its tokens of log p(y_t) - log sum_v p(v)^2), chosen times rejected; constants
    (no gradient)."""
    w = torch.exp((raw_logps.detach() - log_sum_sq.detach()) / lengths)
    return w[:b] * w[b:]


def _head_options(softcap, logit_scale, temperature, ref_softcap, ref_logit_scale, ignore_index, backend, frozen,
                  reduce_hidden_grad, grad_filter=None) -> dict:
    return dict(softcap=softcap, logit_scale=logit_scale, temperature=temperature, ref_softcap=ref_softcap,
                ref_logit_scale=ref_logit_scale, ignore_index=ignore_index, backend=backend, frozen=frozen,
                reduce_hidden_grad=reduce_hidden_grad, grad_filter=grad_filter)


def _check_batch(hidden, name="hidden", paired=True):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 3:
        shape = None if not isinstance(hidden, torch.Tensor) else list(hidden.shape)
        layout = "[2B, T, D] (chosen rows first, then rejected)" if paired else "[N, T, D] (one row per sequence)"
        raise ValueError(f"{name} must have shape {layout}, got {shape}")
    if hidden.shape[0] == 0:
        raise ValueError(f"{name} holds no sequences (shape {list(hidden.shape)}): a loss over an empty "
                         "batch is undefined")
    if paired and hidden.shape[0] % 2:
        raise ValueError(f"{name} must hold 2B sequences (B chosen then B rejected); got {hidden.shape[0]} rows")


def _check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _warn_empty(mask, kind):
    """A sequence with no completion tokens has log-prob 0 and counts as length 1: say so once
    (a host sync, skipped while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return
    empty = (~mask.any(-1)).nonzero().flatten().tolist()
    if empty:
        warnings.warn(f"{len(empty)} of {mask.shape[0]} {kind} sequences have no completion tokens (every target "
                      f"is ignore_index; rows {empty[:8]}{'...' if len(empty) > 8 else ''}): their log-prob is 0 and "
                      "their length counts as 1 in length-normalised losses", UserWarning, stacklevel=3)


def _ref_inputs(ref: HeadTensors, ref_logps, n, needs_ref, types, rows="2B"):
    """Which reference is given: a head (ref_hidden, ref_weight, ref_bias) -> True, ref_logps [n]
    or none -> False; raises on a mix or an incomplete one."""
    has_head = ref.hidden is not None or ref.weight is not None
    if has_head and ref_logps is not None:
        raise ValueError("pass either ref_logps or ref_hidden/ref_weight, not both")
    if has_head and (ref.hidden is None or ref.weight is None):
        raise ValueError("ref_hidden and ref_weight must be given together")
    if ref.bias is not None and not has_head:
        raise ValueError("ref_bias needs ref_hidden/ref_weight")
    if needs_ref and not has_head and ref_logps is None:
        raise ValueError(f"loss_type {types} needs a reference: pass ref_logps [{n}] or ref_hidden/ref_weight")
    if ref_logps is not None and (not isinstance(ref_logps, torch.Tensor) or tuple(ref_logps.shape) != (n,)
                                  or not ref_logps.is_floating_point()):
        raise ValueError(f"ref_logps must be a floating tensor of shape [{rows}]=[{n}], got "
                         f"{getattr(ref_logps, 'shape', type(ref_logps).__name__)}")
    return has_head


def reference_logps(ref_hidden: Tensor, ref_weight: Tensor, targets: Tensor, *, ref_bias: Optional[Tensor] = None,
                    ignore_index: int = -100, softcap: Optional[float] = None, logit_scale: Optional[float] = None,
                    temperature: float = 1.0, backend: Backend = "auto", process_group=None) -> Tensor:
    """Sequence log-probs [rows] of a reference head (softcap, logit_scale, temperature: its
    transform), forward only: no graph, nothing saved. process_group: ref_weight (ref_bias) is this
    rank's vocabulary shard (README "Distributed")."""
    ref_hidden, ((ref_weight, ref_bias),), process_group = _dtensor.resolve(
        ref_hidden, [(ref_weight, ref_bias)], process_group, [("ref_weight", "ref_bias")], "ref_hidden")
    heads = _Heads(_head_options(softcap, logit_scale, temperature, softcap, logit_scale, ignore_index, backend,
                                 "auto", True), process_group)
    return heads.reference_logps(targets, HeadTensors(ref_hidden, ref_weight, ref_bias))


def _nll(heads: _Heads, policy: HeadTensors, targets, nll_targets, mask, b, logps):
    """TRL's NLL term: minus the mean log-prob over the chosen completion tokens of the batch
    (the true token count: empty rows add nothing), or over nll_targets [B, T] (e.g. prompt +
    completion, as ORPOTrainer) on the chosen rows' hidden states. 0 when there is no token."""
    if nll_targets is None:
        return -logps[:b].sum() / mask[:b].sum().clamp(min=1).to(logps.dtype)
    if not isinstance(nll_targets, torch.Tensor) or tuple(nll_targets.shape) not in (
            tuple(targets.shape), (b, *targets.shape[1:])):
        raise ValueError(f"nll_targets must have shape [B, T]=[{b}, {', '.join(map(str, targets.shape[1:]))}] "
                         f"(or [2B, T], of which the chosen rows are used), got "
                         f"{getattr(nll_targets, 'shape', type(nll_targets).__name__)}")
    nt = nll_targets[:b]
    tok = run(heads.call(), nt, policy._replace(hidden=policy.hidden[:b])).logp
    return -tok.sum() / (nt != heads.ignore_index).sum().clamp(min=1).to(tok.dtype)


class _PairLoss:
    """The [B]-sized loss maths of a preference_loss call, shared by the recompute path and the
    gradients-in-forward path (so both give the same loss): Pairs from sequence log-probs, the
    length averaging, the weighted loss types, the reduction."""

    def __init__(self, types, weights, params, beta, label_smoothing, reduction, average_log_prob, lengths, b,
                 use_weighting=False):
        self.types, self.weights, self.params = types, weights, params
        self.beta, self.ls, self.reduction, self.avg = float(beta), float(label_smoothing), reduction, average_log_prob
        self.lengths, self.b, self.use_weighting = lengths, b, use_weighting

    def pair_weights(self, raw_logps, log_sum_sq):
        """WPO's weights [B] from the unweighted sequence log-probs and the sequences' sums of
        log sum_v p^2 (None without use_weighting)."""
        if not self.use_weighting:
            return None
        return _wpo_weights(raw_logps, log_sum_sq.to(raw_logps.dtype), self.lengths.to(raw_logps.dtype), self.b)

    def pairs(self, logps, ref, kl, nll, rows=None):
        """{loss type: Pairs} of the pairs rows (chosen indices; default all B), EXPO's unaveraged."""
        rows = torch.arange(self.b, device=logps.device) if rows is None else rows
        other = rows + self.b
        pick = lambda t, r: None if t is None else t.index_select(0, r)  # noqa: E731
        pairs = Pairs(pick(logps, rows), pick(logps, other), pick(ref, rows), pick(ref, other),
                      self.lengths.index_select(0, rows), self.lengths.index_select(0, other), self.beta, self.ls,
                      self.params, pick(kl, rows), pick(kl, other), nll)
        # EXPO reads average_log_prob itself (its supervised term only); every other loss gets
        # length-averaged sequence log-probs
        averaged = pairs.averaged() if self.avg else pairs
        return {t: pairs if (LOSSES[t].fn is LOSSES["expo"].fn) else averaged for t in self.types}

    def losses(self, pairs_for, pair_weights=None):
        """The weighted sum of the loss types per pair, times each pair's WPO weight if given."""
        out = sum(w * LOSSES[t].fn(pairs_for[t]) for t, w in zip(self.types, self.weights))
        return out if pair_weights is None else out * pair_weights.to(out.dtype)

    def reduce(self, losses):
        return losses.mean() if self.reduction == "mean" else losses.sum() if self.reduction == "sum" else losses

    @property
    def scale(self):
        """d(reduced loss) / d(each pair's loss)."""
        return 1.0 / self.b if self.reduction == "mean" else 1.0


def _gif_blocker(grad_in_forward, types, reduction, policy: HeadTensors, group, frozen_head) -> Optional[str]:
    """Why the gradients-in-forward path cannot serve this call (None: it can)."""
    if not torch.is_grad_enabled() or not any(isinstance(t, Tensor) and t.requires_grad for t in policy):
        return "nothing requires grad"
    coupled = [t for t in types if t in LOSSES and not LOSSES[t].decomposable]
    if coupled:
        return f"loss_type {coupled} couples the pairs of the batch (its per-pair gradient needs every pair)"
    if reduction == "none":
        return "reduction='none': the upstream gradient of each pair's loss is known only in backward"
    if group is not None:
        return "a process group (vocabulary-parallel heads) takes the recompute path"
    if torch.compiler.is_compiling():
        return "torch.compile traces the recompute path (its custom ops)"
    if frozen_head and grad_in_forward is None:
        return "a frozen head takes its one-pass path (4 N D V)"
    return None


def _choose_gif(grad_in_forward, blocker, mask, units, policy: HeadTensors, backend, buffers, kept_mb) -> bool:
    """Whether the call takes the gradients-in-forward path: never with grad_in_forward=False;
    with True wherever it can (else a ValueError saying why); by default where it can and at least
    one unit (a pair, a KTO sequence) fits the kept budget alone (if none does, every unit would
    take two passes: the recompute path's work)."""
    if grad_in_forward is False:
        return False
    if blocker is not None:
        if grad_in_forward:
            raise ValueError(f"grad_in_forward=True cannot apply here: {blocker}; use grad_in_forward=None (the "
                             "default picks the path) or False")
        return False
    if grad_in_forward:
        return True
    h = policy.hidden
    # the kept buffers' element: the torch backend keeps fp32 (fp64 for fp64), Triton the operand dtype
    elem = 8 if h.dtype == torch.float64 else 4 if resolve_backend(backend, h.device, h.dtype) == "torch" else \
        h.element_size()
    rows = mask.sum(-1)[units].sum(-1)
    return bool((rows * policy.weight.shape[0] * elem * buffers <= kept_bytes(kept_mb, h.device)).any())


class Metrics(dict):
    """The metrics of preference_loss and kto_loss (a dict of 0-dim tensors, as TRL logs them)
    with the per-sequence values behind them in `.sequences`, for reductions across ranks
    (token-weighted where the metric is a token mean)."""

    def __init__(self, metrics: dict, sequences: "Sequences"):
        super().__init__(metrics)
        self.sequences = sequences


class Sequences(NamedTuple):
    """The per-sequence values of a loss call (detached; rows as hidden's: preference_loss's 2B,
    kto_loss's N): logps (as the loss uses them: weighted with ld_alpha, averaged with
    average_log_prob in kto_loss), ref_logps or None, kl (EXPO's exact KL) or None, stats [rows, T, 4]
    per token (sum of logits, entropy, argmax hit, log sum_v p^2; 0 on ignored positions), mask
    [rows, T] the scored positions, vocab V."""
    logps: Tensor
    ref_logps: Optional[Tensor]
    kl: Optional[Tensor]
    stats: Tensor
    mask: Tensor
    vocab: int


def preference_loss(hidden: Tensor, weight: Tensor, targets: Tensor, *,
                    loss_type: Union[str, Sequence[str]] = "sigmoid", beta: float = 0.1,
                    bias: Optional[Tensor] = None, ref_hidden: Optional[Tensor] = None,
                    ref_weight: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
                    ref_logps: Optional[Tensor] = None, ignore_index: int = -100, softcap: Optional[float] = None,
                    logit_scale: Optional[float] = None, temperature: float = 1.0,
                    ref_softcap: Union[float, None, Same] = "same", ref_logit_scale: Union[float, None, Same] = "same",
                    label_smoothing: float = 0.0, loss_weights: Optional[Sequence[float]] = None,
                    reduction: Reduction = "mean", backend: Backend = "auto", average_log_prob: bool = False,
                    nll_targets: Optional[Tensor] = None, ld_alpha: Optional[float] = None,
                    use_weighting: bool = False, frozen: FrozenMode = "auto",
                    grad_in_forward: Optional[bool] = None, kept_mb: Optional[float] = None,
                    grad_filter: Union[float, Literal["auto"], None] = None, process_group=None,
                    reduce_hidden_grad: bool = True, **loss_specific) -> tuple[Tensor, Metrics]:
    """Fused preference loss. Returns (loss, metrics); see README for every loss type.
    softcap, logit_scale, temperature: the policy head's logit transform (the reference head's
    defaults to the same). ld_alpha: LD-DPO's weight of the tokens past each pair's shared length
    in the sequence log-probs (policy and reference head; TRL's ld_alpha). use_weighting: WPO's
    pair weights (TRL's use_weighting). grad_in_forward: None (default) computes the gradients
    inside the forward pass wherever that applies (6 N D V for a trainable head instead of 8;
    README "Gradients in forward"), False forces the recompute path, True asks for it and raises
    where it cannot apply; kept_mb bounds its kept logits (default FUSEDPREF_CHUNK_MB, else 8 MiB
    on the CPU and 1024 MiB on CUDA). grad_filter: None (exact), a float or "auto" (the operand
    dtype's eps / 32): dz blocks whose largest |dz| is below it skip their dH and dW products, on
    either path (torch backend; README "Gradient filtering"). process_group: vocabulary-parallel heads (weight, bias,
    ref_weight, ref_bias this rank's shards; hidden, targets the same on every rank); DTensor heads
    are resolved once per call (README "Distributed"). metrics.sequences holds the per-sequence
    values behind the metrics (Sequences)."""
    types, weights, params = check_loss_args(loss_type, loss_weights, label_smoothing, beta, loss_specific,
                                             average_log_prob)
    _check_reduction(reduction)
    _check_batch(hidden)
    if grad_in_forward is not None and not isinstance(grad_in_forward, bool):
        raise TypeError(f"grad_in_forward must be None, True or False, got {grad_in_forward!r}")
    if not isinstance(use_weighting, bool):
        raise TypeError(f"use_weighting must be a bool, got {use_weighting!r}")
    has_expo = any(LOSSES[t].fn is LOSSES["expo"].fn for t in types)
    if ld_alpha is not None:
        if not is_real(ld_alpha) or not 0 <= ld_alpha <= 1:
            raise ValueError(f"ld_alpha must be None or a float in [0, 1], got {ld_alpha!r}")
        if has_expo:
            raise ValueError("ld_alpha weights the log-ratio of DPO-family losses; loss_type 'expo' has no such "
                             "weighting (its KL runs over every token)")
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, group = _dtensor.resolve_heads(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, process_group)
    heads = _Heads(_head_options(softcap, logit_scale, temperature, ref_softcap, ref_logit_scale, ignore_index,
                                 backend, frozen, reduce_hidden_grad, grad_filter), group)
    policy, ref = HeadTensors(hidden, weight, bias), HeadTensors(ref_hidden, ref_weight, ref_bias)
    two_b = hidden.shape[0]
    needs_ref = any(LOSSES[t].needs_ref for t in types)
    has_fused_ref = _ref_inputs(ref, ref_logps, two_b, needs_ref, types)
    if nll_targets is not None and not set(types) & NLL_LOSSES:
        raise ValueError(f"nll_targets is used by the NLL term of {sorted(NLL_LOSSES)}, not by loss_type {types}")

    expo_vocab = has_expo and params.get("expo_kl") == "vocab"
    if expo_vocab and not has_fused_ref:
        raise ValueError("loss_type 'expo' with expo_kl='vocab' needs ref_hidden/ref_weight (the exact "
                         "KL runs over the reference head's vocabulary); use expo_kl='sequence' with ref_logps")
    b = two_b // 2
    mask = targets.long() != heads.ignore_index      # any integer dtype (uint8 cannot hold -100)
    _warn_empty(mask, "preference")
    token_weight = None if ld_alpha is None else _ld_weights(mask, b, ld_alpha)
    frozen_head = isinstance(hidden, Tensor) and hidden.requires_grad and not weight.requires_grad and not (
        bias is not None and bias.requires_grad)
    blocker = _gif_blocker(grad_in_forward, types, reduction, policy, group, frozen_head)
    if blocker is None and set(types) & NLL_LOSSES and (ld_alpha is not None or use_weighting):
        blocker = (f"the NLL term of {sorted(set(types) & NLL_LOSSES)} with "
                   f"{'ld_alpha' if ld_alpha is not None else 'use_weighting'} (its gradient needs every pair first)")
    chosen = torch.arange(b, device=hidden.device)
    use_gif = _choose_gif(grad_in_forward, blocker, mask, torch.stack([chosen, chosen + b], 1), policy, backend,
                          2 if expo_vocab else 1, kept_mb)

    kl = ref_seq = None
    if not expo_vocab and has_fused_ref:     # the reference, forward only, before either path
        check_pair(policy, ref, group is not None)
        ref_seq = heads.reference_logps(targets, ref, token_weight)
    elif ref_logps is not None:
        ref_seq = ref_logps.detach().to(device=hidden.device, dtype=torch.float64 if hidden.dtype == torch.float64
                                        else torch.float32)
    dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    assembly = _PairLoss(types, weights, params, beta, label_smoothing, reduction, average_log_prob,
                         mask.sum(-1).to(dt).clamp(min=1), b, use_weighting)
    if use_gif:
        logps, loss, ref_out, kl, stats, vocab, nll = _fused_pairs(heads, policy, ref if expo_vocab else None,
                                                                   targets, mask, ref_seq, nll_targets, assembly,
                                                                   token_weight, kept_mb)
        if expo_vocab:
            ref_seq = ref_out
        pairs_for = assembly.pairs(logps, ref_seq, kl, nll)
        return loss, _metrics(pairs_for[types[0]], LOSSES[types[0]].rewards, stats, mask, vocab, b, logps, ref_seq,
                          kl)

    if expo_vocab:
        # 1+2+3 in one pass over both heads: the policy's per-token log-probs (and metric
        # statistics), the reference's, and EXPO's exact vocabulary KL(p_ref || p_theta)
        out = run(heads.call(two_heads=True, stats=True), targets, policy, ref)
        ref_seq, kl = out.ref_logp.sum(-1), out.div.sum(-1)
    else:
        # 1. policy: per-token log-probs (fused) summed per sequence, plus metric statistics
        out = run(heads.call(stats=True), targets, policy)
    raw, stats, vocab = out.logp.sum(-1), out.stats, out.vocab
    logps = _weighted_sum(out.logp, token_weight) if token_weight is not None else raw
    if ref_seq is not None:
        ref_seq = ref_seq.to(logps.dtype)
    # 3. the NLL term of sft / cpo / orpo (only when one of them is asked for): unweighted log-probs
    nll = _nll(heads, policy, targets, nll_targets, mask, b, raw) if set(types) & NLL_LOSSES else None
    pairs_for = assembly.pairs(logps, ref_seq, kl, nll)
    # 4. the loss on [B] tensors (WPO: each pair's times its weight)
    pair_w = assembly.pair_weights(raw, (stats[..., 3] * mask.to(stats.dtype)).sum(-1)) if use_weighting else None
    loss = assembly.reduce(assembly.losses(pairs_for, pair_w))
    return loss, _metrics(pairs_for[types[0]], LOSSES[types[0]].rewards, stats, mask, vocab, b, logps, ref_seq,
                          kl)


def _fused_pairs(heads, policy, ref, targets, mask, ref_seq, nll_targets, assembly: _PairLoss, token_weight,
                 kept_mb):
    """The loss with its gradient in the forward pass (functions.run_loss): (sequence log-probs [2B],
    loss, the reference's sequence log-probs (EXPO's pass) or None, sequence KL or None, per-token
    statistics, V, the NLL term or None). The NLL term comes with neither ld_alpha nor WPO weights
    here (the caller's blocker)."""
    two_b, t_len = targets.shape[0], targets.shape[1] if targets.dim() > 1 else 1
    b = assembly.b
    dev = policy.hidden.device
    nll_types = set(assembly.types) & NLL_LOSSES
    n_chosen = mask[:b].sum().clamp(min=1)
    nll_ext = None
    if nll_types and nll_targets is not None:   # the NLL over other targets: its own head call (recompute)
        nll_ext = _nll(heads, policy, targets, nll_targets, mask, b, None)

    def nll_of(logps):
        if not nll_types:
            return None
        return nll_ext.detach() if nll_ext is not None else -logps[:b].sum() / n_chosen.to(logps.dtype)

    def refs_of(sums: SeqSums, dtype):
        refs = sums.ref_logp if sums.ref_logp is not None else ref_seq
        return None if refs is None else refs.to(dtype)

    def unit_grads(units, sums: SeqSums):
        """dL/dlogp and dL/dKL [2B] of the units (pairs) in a chunk, by autograd on their [k] values."""
        rows = units[:, 0]
        pair_w = assembly.pair_weights(sums.raw_logp, sums.stats[:, 3])
        with torch.enable_grad():
            lp = sums.logp.detach().clone().requires_grad_()
            kl = None if sums.kl is None else sums.kl.detach().clone().requires_grad_()
            nll_leaf = torch.zeros((), dtype=lp.dtype, device=dev, requires_grad=True) if nll_types else None
            pairs_for = assembly.pairs(lp, refs_of(sums, lp.dtype), kl, nll_leaf, rows)
            total = assembly.losses(pairs_for, None if pair_w is None else pair_w.index_select(0, rows)).sum() \
                * assembly.scale
            inputs = [lp] + ([kl] if kl is not None else []) + ([nll_leaf] if nll_leaf is not None else [])
            got = list(torch.autograd.grad(total, inputs, allow_unused=True))
        g_lp = got.pop(0)
        g_lp = torch.zeros_like(lp) if g_lp is None else g_lp
        g_kl = None
        if kl is not None:
            g_kl = got.pop(0)
            g_kl = torch.zeros_like(kl) if g_kl is None else g_kl
        if nll_leaf is not None and nll_ext is None:
            # the NLL term is linear in NLL = -sum of the chosen log-probs / their count: each pair's
            # coefficient is the same, so the batch's is B times this chunk's per pair
            g_nll = got.pop(0)
            coef = (0.0 if g_nll is None else g_nll) * (b / rows.numel())
            g_lp = g_lp.clone()
            g_lp[:b] -= coef / n_chosen.to(g_lp.dtype)
            keep = torch.zeros(two_b, dtype=torch.bool, device=dev)
            keep[rows] = True
            keep[rows + b] = True
            g_lp = torch.where(keep, g_lp, torch.zeros_like(g_lp))
        return g_lp, g_kl

    def total(sums: SeqSums):
        pairs_for = assembly.pairs(sums.logp, refs_of(sums, sums.logp.dtype), sums.kl, nll_of(sums.logp))
        return assembly.reduce(assembly.losses(pairs_for, assembly.pair_weights(sums.raw_logp, sums.stats[:, 3])))

    seq = torch.arange(two_b, device=dev).repeat_interleave(t_len)
    units = torch.stack([torch.arange(b, device=dev), torch.arange(b, device=dev) + b], 1)
    layout = LossRows(seq, units, two_b, None if token_weight is None else token_weight.reshape(-1))
    plan = LossPlan(heads.call(two_heads=ref is not None, stats=True), layout, unit_grads, total,
                    kept_bytes(kept_mb, dev))
    loss, logps, ref_out, kl, stats = run_loss(plan, targets, policy, ref)
    nll = nll_of(logps)
    if nll_ext is not None:
        # the NLL's own call carries its gradient: add it at the loss's coefficient of NLL
        refs = ref_out if ref is not None else ref_seq
        with torch.enable_grad():
            nll_leaf = nll_ext.detach().clone().requires_grad_()
            probe = assembly.reduce(assembly.losses(assembly.pairs(
                logps, None if refs is None else refs.to(logps.dtype), kl, nll_leaf)))
            coef, = torch.autograd.grad(probe, nll_leaf)
        loss = loss + coef * (nll_ext - nll_ext.detach())
        nll = nll_ext.detach()
    return logps, loss, ref_out, kl, stats, policy.weight.shape[0], nll


@torch.no_grad()
def _metrics(p: Pairs, rewards_kind, stats, mask, vocab, b, logps, ref_seq, kl) -> Metrics:
    """TRL's metrics of the pairs (p: those of the first loss type, maybe length-averaged) and the
    unaveraged sequence values behind them."""
    if p.ref_chosen is not None and rewards_kind == "ratio":
        rc, rr = p.beta * (p.chosen - p.ref_chosen), p.beta * (p.rejected - p.ref_rejected)
    elif rewards_kind == "avg":
        rc, rr = p.beta * p.chosen_avg, p.beta * p.rejected_avg
    else:
        rc, rr = p.beta * p.chosen, p.beta * p.rejected
    m = mask.to(stats.dtype)
    mc, mr = m[:b], m[b:]

    def token_mean(x, w):
        return (x * w).sum() / w.sum().clamp(min=1)

    out = {
        "rewards/chosen": rc.detach().mean(),
        "rewards/rejected": rr.detach().mean(),
        "rewards/accuracies": (rc > rr).float().mean(),
        "rewards/margins": (rc - rr).detach().mean(),
        "logps/chosen": p.chosen.detach().mean(),
        "logps/rejected": p.rejected.detach().mean(),
        "logits/chosen": token_mean(stats[:b, :, 0] / vocab, mc),
        "logits/rejected": token_mean(stats[b:, :, 0] / vocab, mr),
        "entropy": token_mean(stats[..., 1], m),
        "mean_token_accuracy": token_mean(stats[:b, :, 2], mc),
    }
    if p.kl_chosen is not None:     # EXPO's exact KL(p_ref || p_theta), summed over each sequence's tokens
        out["kl/chosen"], out["kl/rejected"] = p.kl_chosen.detach().mean(), p.kl_rejected.detach().mean()
    return Metrics(out, Sequences(logps.detach(), None if ref_seq is None else ref_seq.detach(),
                                            None if kl is None else kl.detach(),
                                            stats.detach(), mask, vocab))


class FusedLinearPreferenceLoss(torch.nn.Module):
    """nn.Module front of preference_loss: stores hyperparameters only, no parameters."""

    def __init__(self, loss_type: Union[str, Sequence[str]] = "sigmoid", beta: float = 0.1, *,
                 ignore_index: int = -100, softcap: Optional[float] = None, logit_scale: Optional[float] = None,
                 temperature: float = 1.0, ref_softcap: Union[float, None, Same] = "same",
                 ref_logit_scale: Union[float, None, Same] = "same", label_smoothing: float = 0.0,
                 loss_weights: Optional[Sequence[float]] = None, reduction: Reduction = "mean",
                 backend: Backend = "auto", average_log_prob: bool = False, frozen: FrozenMode = "auto",
                 **loss_specific):
        super().__init__()
        # every hyperparameter is checked here, not first at forward
        check_loss_args(loss_type, loss_weights, label_smoothing, beta, loss_specific, average_log_prob)
        _check_reduction(reduction)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        check_softcap(softcap)
        _Heads(_head_options(softcap, logit_scale, temperature, ref_softcap, ref_logit_scale, ignore_index, backend,
                             frozen, True), None).call()
        self.kwargs = dict(loss_type=loss_type, beta=beta, ignore_index=ignore_index, softcap=softcap,
                           logit_scale=logit_scale, temperature=temperature, ref_softcap=ref_softcap,
                           ref_logit_scale=ref_logit_scale, label_smoothing=label_smoothing,
                           loss_weights=loss_weights, reduction=reduction, backend=backend,
                           average_log_prob=average_log_prob, frozen=frozen, **loss_specific)

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor] = None, *,
                ref_hidden: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
                ref_bias: Optional[Tensor] = None, ref_logps: Optional[Tensor] = None,
                nll_targets: Optional[Tensor] = None, process_group=None,
                reduce_hidden_grad: bool = True) -> tuple[Tensor, Metrics]:
        return preference_loss(hidden, weight, targets, bias=bias, ref_hidden=ref_hidden,
                               ref_weight=ref_weight, ref_bias=ref_bias, ref_logps=ref_logps,
                               nll_targets=nll_targets, process_group=process_group,
                               reduce_hidden_grad=reduce_hidden_grad, **self.kwargs)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


def _check_kto_options(beta, desirable_weight, undesirable_weight, average_log_prob):
    if not is_real(beta) or not math.isfinite(beta) or not beta > 0:
        raise ValueError(f"beta must be a positive finite float, got {beta!r}")
    for name, value in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not is_real(value) or not math.isfinite(value) or not value >= 0:
            raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    if not isinstance(average_log_prob, bool):
        raise TypeError(f"average_log_prob must be a bool, got {type(average_log_prob).__name__}")


def kto_loss(hidden: Tensor, weight: Tensor, targets: Tensor, labels: Tensor, *, beta: float = 0.1,
             bias: Optional[Tensor] = None, ref_hidden: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
             ref_bias: Optional[Tensor] = None, ref_logps: Optional[Tensor] = None,
             kl_hidden: Optional[Tensor] = None, kl_targets: Optional[Tensor] = None,
             ref_kl_hidden: Optional[Tensor] = None, kl_logps: Optional[Tensor] = None,
             ref_kl_logps: Optional[Tensor] = None, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             ignore_index: int = -100, softcap: Optional[float] = None, logit_scale: Optional[float] = None,
             temperature: float = 1.0, ref_softcap: Union[float, None, Same] = "same",
             ref_logit_scale: Union[float, None, Same] = "same", reduction: Reduction = "mean",
             backend: Backend = "auto", average_log_prob: bool = False, frozen: FrozenMode = "auto",
             grad_in_forward: Optional[bool] = None, kept_mb: Optional[float] = None,
             grad_filter: Union[float, Literal["auto"], None] = None, process_group=None,
             reduce_hidden_grad: bool = True) -> tuple[Tensor, Metrics]:
    """KTO (TRL's KTOTrainer) on unpaired sequences: hidden [N, T, D], targets [N, T], labels [N]
    bool (True = desirable). The reference-KL estimate z0 = clamp(mean(kl_logps - ref_kl_logps), 0)
    comes from mismatched completions, either precomputed (kl_logps, ref_kl_logps [M]) or through
    the fused heads forward-only (kl_hidden, ref_kl_hidden [M, T', D] with kl_targets [M, T']);
    it is detached, as in TRL. Without either, z0 = 0.
        desirable:   w_d * (1 - sigmoid(beta * (logratio - z0)))
        undesirable: w_u * (1 - sigmoid(beta * (z0 - logratio)))
    average_log_prob=True (Liger's KTO) uses length-averaged sequence log-probs throughout
    (precomputed ref_logps / kl_logps are then expected averaged too).
    grad_in_forward, kept_mb, grad_filter: as preference_loss's (each sequence is a unit of the fused pass).
    process_group: vocabulary-parallel heads, as preference_loss's.
    """
    _check_reduction(reduction)
    if grad_in_forward is not None and not isinstance(grad_in_forward, bool):
        raise TypeError(f"grad_in_forward must be None, True or False, got {grad_in_forward!r}")
    _check_kto_options(beta, desirable_weight, undesirable_weight, average_log_prob)
    _check_batch(hidden, paired=False)
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, group = _dtensor.resolve_heads(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, process_group)
    kl_hidden, ref_kl_hidden = (_dtensor.resolve_hidden(t, name) for t, name in
                                ((kl_hidden, "kl_hidden"), (ref_kl_hidden, "ref_kl_hidden")))
    heads = _Heads(_head_options(softcap, logit_scale, temperature, ref_softcap, ref_logit_scale, ignore_index,
                                 backend, frozen, reduce_hidden_grad, grad_filter), group)
    policy, ref = HeadTensors(hidden, weight, bias), HeadTensors(ref_hidden, ref_weight, ref_bias)
    n = hidden.shape[0]
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (n,) or labels.dtype != torch.bool:
        raise ValueError(f"labels must be a bool tensor of shape [N]=[{n}] (True = desirable), got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {list(getattr(labels, 'shape', []))}")
    has_head = _ref_inputs(ref, ref_logps, n, True, ["kto"], "N")
    fused_kl = any(t is not None for t in (kl_hidden, ref_kl_hidden, kl_targets))
    pre_kl = kl_logps is not None or ref_kl_logps is not None
    if fused_kl and pre_kl:
        raise ValueError("pass either kl_logps/ref_kl_logps (precomputed) or kl_hidden/ref_kl_hidden/kl_targets "
                         "(fused) for the KL estimate, not both")
    if fused_kl and (kl_hidden is None or ref_kl_hidden is None or kl_targets is None):
        raise ValueError("the fused KL estimate needs kl_hidden, ref_kl_hidden and kl_targets together")
    if fused_kl and not has_head:
        raise ValueError("the fused KL estimate runs the reference head on ref_kl_hidden: pass "
                         "ref_hidden/ref_weight instead of ref_logps, or precomputed kl_logps/ref_kl_logps")
    if pre_kl and (kl_logps is None or ref_kl_logps is None):
        raise ValueError("kl_logps and ref_kl_logps must be given together")

    def per_token_mean(logps, t):
        return logps / (t.long() != heads.ignore_index).sum(-1).clamp(min=1).to(logps.dtype) if average_log_prob \
            else logps

    _warn_empty(targets.long() != heads.ignore_index, "KTO")
    dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if has_head:
        check_pair(policy, ref, group is not None)
        ref_seq = per_token_mean(heads.reference_logps(targets, ref), targets)
    else:
        ref_seq = ref_logps.detach().to(device=hidden.device, dtype=dt)
    # the reference-KL estimate (detached)
    if fused_kl:
        with torch.no_grad():
            kl_pol, _, _ = heads.sequence_logps(kl_targets, HeadTensors(*(None if t is None else t.detach() for t in
                                                                          (kl_hidden, weight, bias))))
        kl_ref = heads.reference_logps(kl_targets, ref._replace(hidden=ref_kl_hidden))
        z0 = (per_token_mean(kl_pol, kl_targets) - per_token_mean(kl_ref, kl_targets)).mean().clamp(min=0)
    elif pre_kl:
        z0 = (kl_logps.detach() - ref_kl_logps.detach()).mean().clamp(min=0).to(device=hidden.device, dtype=dt)
    else:
        z0 = ref_seq.new_zeros(())
    beta, desirable_weight, undesirable_weight = float(beta), float(desirable_weight), float(undesirable_weight)

    def kto(logps):
        """Each sequence's loss [N] from its (length-averaged) log-prob."""
        logratio = logps - ref_seq.to(logps.dtype)
        return torch.where(labels, desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0))),
                           undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio))))

    def reduce(losses):
        return losses.mean() if reduction == "mean" else losses.sum() if reduction == "sum" else losses

    frozen_head = hidden.requires_grad and not weight.requires_grad and not (bias is not None and bias.requires_grad)
    use_gif = _choose_gif(grad_in_forward, _gif_blocker(grad_in_forward, ["kto"], reduction, policy, group,
                                                        frozen_head),
                          targets.long() != heads.ignore_index, torch.arange(n, device=hidden.device)[:, None], policy,
                          backend, 1, kept_mb)
    if use_gif:
        lengths = (targets.long() != heads.ignore_index).sum(-1).clamp(min=1).to(dt)
        scale = 1.0 / n if reduction == "mean" else 1.0

        def seq_logps(raw):
            return raw / lengths.to(raw.dtype) if average_log_prob else raw

        def unit_grads(units, sums: SeqSums):
            rows = units[:, 0]
            with torch.enable_grad():
                lp = sums.logp.detach().clone().requires_grad_()
                total = kto(seq_logps(lp)).index_select(0, rows).sum() * scale
                g, = torch.autograd.grad(total, lp)
            return g, None

        t_len = targets.shape[1]
        seq = torch.arange(n, device=hidden.device).repeat_interleave(t_len)
        plan = LossPlan(heads.call(stats=True), LossRows(seq, torch.arange(n, device=hidden.device)[:, None], n),
                        unit_grads, lambda sums: reduce(kto(seq_logps(sums.logp))), kept_bytes(kept_mb, hidden.device))
        loss, raw, _, _, stats = run_loss(plan, targets, policy)
        logps = seq_logps(raw)
        vocab = weight.shape[0]
    else:
        logps, stats, vocab = heads.sequence_logps(targets, policy, stats=True)
        logps = per_token_mean(logps, targets)
        loss = reduce(kto(logps))
    logratio = logps - ref_seq.to(logps.dtype)
    with torch.no_grad():
        rewards = beta * logratio

        def masked_mean(x, m):   # 0 when no sequence (token) of that kind is in the batch
            return (x * m).sum() / m.sum().clamp(min=1)
        d, u = labels.to(logps.dtype), (~labels).to(logps.dtype)
        tok = (targets.long() != heads.ignore_index).to(stats.dtype)
        per_logit = stats[..., 0] / vocab
        metrics = {"rewards/chosen": masked_mean(rewards, d), "rewards/rejected": masked_mean(rewards, u),
                   "rewards/margins": masked_mean(rewards, d) - masked_mean(rewards, u),
                   "logps/chosen": masked_mean(logps, d), "logps/rejected": masked_mean(logps, u),
                   "kl": z0.detach(), "entropy": masked_mean(stats[..., 1], tok),
                   "logits/chosen": masked_mean(per_logit, tok * d[:, None]),
                   "logits/rejected": masked_mean(per_logit, tok * u[:, None])}
    return loss, Metrics(metrics, Sequences(logps.detach(), ref_seq.detach().to(logps.dtype), None, stats.detach(),
                                            tok > 0, vocab))
