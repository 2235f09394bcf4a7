"""preference_loss(...): fused LM head -> per-token log-probs -> sequence sums -> loss + metrics.

Batch convention (TRL's and Liger's): hidden [2B, T, D], targets [2B, T]; rows 0..B-1 are the
chosen sequences, rows B..2B-1 the rejected ones; positions equal to ignore_index (prompt,
padding) are skipped.
"""
from __future__ import annotations

import torch

from .functions import LinearLogProbs, LinearLogProbsKL
from .losses import LOSSES, Pairs, check_loss_args

REDUCTIONS = ("mean", "sum", "none")


def _sequence_logps(hidden, weight, targets, bias, ignore_index, softcap, backend, with_stats):
    logp, stats = LinearLogProbs.apply(hidden, weight, targets, bias, ignore_index, softcap,
                                       backend, with_stats)
    return logp.sum(-1), stats


def _check_batch(hidden, targets, name="hidden"):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 3:
        raise ValueError(f"{name} must have shape [2B, T, D] (chosen rows first, then rejected), "
                         f"got {None if not isinstance(hidden, torch.Tensor) else list(hidden.shape)}")
    if hidden.shape[0] % 2:
        raise ValueError(f"{name} must hold 2B sequences (B chosen then B rejected); got {hidden.shape[0]} rows")


def reference_logps(ref_hidden, ref_weight, targets, *, ref_bias=None, ignore_index=-100, softcap=None,
                    backend="auto"):
    """Sequence log-probs [2B] of a reference head, forward only: no graph, nothing saved."""
    with torch.no_grad():
        logps, _ = _sequence_logps(ref_hidden.detach(), ref_weight.detach(), targets,
                                   None if ref_bias is None else ref_bias.detach(),
                                   ignore_index, softcap, backend, False)
    return logps


def preference_loss(hidden, weight, targets, *, loss_type="sigmoid", beta=0.1, bias=None,
                    ref_hidden=None, ref_weight=None, ref_bias=None, ref_logps=None,
                    ignore_index=-100, softcap=None, label_smoothing=0.0, loss_weights=None,
                    reduction="mean", backend="auto", **loss_specific):
    """Fused preference loss. Returns (loss, metrics); see README for every loss type."""
    types, weights, params = check_loss_args(loss_type, loss_weights, label_smoothing, beta, loss_specific)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_batch(hidden, targets)
    needs_ref = any(LOSSES[t].needs_ref for t in types)
    has_fused_ref = ref_hidden is not None or ref_weight is not None
    if has_fused_ref and ref_logps is not None:
        raise ValueError("pass either ref_logps or ref_hidden/ref_weight, not both")
    if has_fused_ref and (ref_hidden is None or ref_weight is None):
        raise ValueError("ref_hidden and ref_weight must be given together")
    if needs_ref and not has_fused_ref and ref_logps is None:
        raise ValueError(f"loss_type {types} needs a reference: pass ref_logps [2B] or ref_hidden/ref_weight")

    expo_vocab = any(LOSSES[t].fn is LOSSES["expo"].fn for t in types) and params.get("expo_kl") == "vocab"
    if expo_vocab and not has_fused_ref:
        raise ValueError("loss_type 'expo' with expo_kl='vocab' needs ref_hidden/ref_weight (the exact "
                         "KL runs over the reference head's vocabulary); use expo_kl='sequence' with ref_logps")
    if has_fused_ref:
        _check_batch(ref_hidden, targets, "ref_hidden")
    two_b = hidden.shape[0]
    if ref_logps is not None and (not isinstance(ref_logps, torch.Tensor) or tuple(ref_logps.shape) != (two_b,)):
        raise ValueError(f"ref_logps must be a tensor of shape [2B]=[{two_b}], got "
                         f"{getattr(ref_logps, 'shape', type(ref_logps).__name__)}")

    kl = ref = None
    if expo_vocab:
        # 1+2+3 in one pass over both heads: the policy's per-token log-probs (and metric
        # statistics), the reference's, and EXPO's exact vocabulary KL(p_ref || p_theta)
        logp, ref_logp, kl_tok, stats = LinearLogProbsKL.apply(
            hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, ignore_index, softcap,
            backend, True)
        logps, ref, kl = logp.sum(-1), ref_logp.sum(-1), kl_tok.sum(-1)
    else:
        # 1. policy: per-token log-probs (fused) summed per sequence, plus metric statistics
        logps, stats = _sequence_logps(hidden, weight, targets, bias, ignore_index, softcap, backend, True)
        # 2. reference: the fused kernel forward-only, or precomputed
        if has_fused_ref:
            ref = reference_logps(ref_hidden, ref_weight, targets, ref_bias=ref_bias,
                                  ignore_index=ignore_index, softcap=softcap, backend=backend)
        elif ref_logps is not None:
            ref = ref_logps.detach().to(device=logps.device, dtype=logps.dtype)
    b = two_b // 2
    mask = targets != ignore_index
    lengths = mask.sum(-1).to(logps.dtype).clamp(min=1)

    pairs = Pairs(logps[:b], logps[b:], None if ref is None else ref[:b], None if ref is None else ref[b:],
                  lengths[:b], lengths[b:], float(beta), float(label_smoothing), params,
                  None if kl is None else kl[:b], None if kl is None else kl[b:])

    # 4. the loss on [B] tensors
    losses = sum(w * LOSSES[t].fn(pairs) for t, w in zip(types, weights))
    loss = losses.mean() if reduction == "mean" else losses.sum() if reduction == "sum" else losses
    return loss, _metrics(pairs, LOSSES[types[0]].rewards, stats, mask, weight.shape[0], b)


@torch.no_grad()
def _metrics(p: Pairs, rewards_kind, stats, mask, vocab, b):
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

    return {
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


class FusedLinearPreferenceLoss(torch.nn.Module):
    """nn.Module front of preference_loss: stores hyperparameters only, no parameters."""

    def __init__(self, loss_type="sigmoid", beta=0.1, *, ignore_index=-100, softcap=None,
                 label_smoothing=0.0, loss_weights=None, reduction="mean", backend="auto", **loss_specific):
        super().__init__()
        check_loss_args(loss_type, loss_weights, label_smoothing, beta, loss_specific)
        self.kwargs = dict(loss_type=loss_type, beta=beta, ignore_index=ignore_index, softcap=softcap,
                           label_smoothing=label_smoothing, loss_weights=loss_weights,
                           reduction=reduction, backend=backend, **loss_specific)

    def forward(self, hidden, weight, targets, bias=None, *, ref_hidden=None, ref_weight=None,
                ref_bias=None, ref_logps=None):
        return preference_loss(hidden, weight, targets, bias=bias, ref_hidden=ref_hidden,
                               ref_weight=ref_weight, ref_bias=ref_bias, ref_logps=ref_logps, **self.kwargs)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


def kto_loss(hidden, weight, targets, labels, *, beta=0.1, bias=None, ref_hidden=None, ref_weight=None,
             ref_bias=None, ref_logps=None, kl_hidden=None, kl_targets=None, ref_kl_hidden=None,
             kl_logps=None, ref_kl_logps=None, desirable_weight=1.0, undesirable_weight=1.0,
             ignore_index=-100, softcap=None, reduction="mean", backend="auto"):
    """KTO (TRL's KTOTrainer) on unpaired sequences: hidden [N, T, D], targets [N, T], labels [N]
    bool (True = desirable). The reference-KL estimate z0 = clamp(mean(kl_logps - ref_kl_logps), 0)
    comes from mismatched completions, either precomputed (kl_logps, ref_kl_logps [M]) or through
    the fused heads forward-only (kl_hidden, ref_kl_hidden [M, T', D] with kl_targets [M, T']);
    it is detached, as in TRL. Without either, z0 = 0.
        desirable:   w_d * (1 - sigmoid(beta * (logratio - z0)))
        undesirable: w_u * (1 - sigmoid(beta * (z0 - logratio)))
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"beta must be a positive float, got {beta!r}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 3:
        raise ValueError("hidden must have shape [N, T, D] (one row per unpaired sequence)")
    n = hidden.shape[0]
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (n,) or labels.dtype != torch.bool:
        raise ValueError(f"labels must be a bool tensor of shape [N]=[{n}] (True = desirable), got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {list(getattr(labels, 'shape', []))}")
    if (ref_hidden is None) == (ref_logps is None) or (ref_hidden is None) != (ref_weight is None):
        raise ValueError("KTO needs a reference: pass ref_logps [N] or ref_hidden/ref_weight (not both)")
    logps, _ = _sequence_logps(hidden, weight, targets, bias, ignore_index, softcap, backend, False)
    if ref_hidden is not None:
        ref = reference_logps(ref_hidden, ref_weight, targets, ref_bias=ref_bias, ignore_index=ignore_index,
                              softcap=softcap, backend=backend)
    else:
        if tuple(ref_logps.shape) != (n,):
            raise ValueError(f"ref_logps must have shape [N]=[{n}], got {list(ref_logps.shape)}")
        ref = ref_logps.detach().to(logps)
    # the reference-KL estimate (detached)
    if kl_hidden is not None or ref_kl_hidden is not None:
        if kl_hidden is None or ref_kl_hidden is None or kl_targets is None or kl_logps is not None:
            raise ValueError("the fused KL estimate needs kl_hidden, ref_kl_hidden and kl_targets "
                             "(and no kl_logps)")
        with torch.no_grad():
            kl_pol, _ = _sequence_logps(kl_hidden.detach(), weight.detach(), kl_targets,
                                        None if bias is None else bias.detach(), ignore_index, softcap,
                                        backend, False)
        kl_ref = reference_logps(ref_kl_hidden, ref_weight, kl_targets, ref_bias=ref_bias,
                                 ignore_index=ignore_index, softcap=softcap, backend=backend)
        z0 = (kl_pol - kl_ref).mean().clamp(min=0)
    elif kl_logps is not None or ref_kl_logps is not None:
        if kl_logps is None or ref_kl_logps is None:
            raise ValueError("kl_logps and ref_kl_logps must be given together")
        z0 = (kl_logps.detach() - ref_kl_logps.detach()).mean().clamp(min=0).to(logps)
    else:
        z0 = logps.new_zeros(())
    logratio = logps - ref
    losses = torch.where(labels,
                         desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio))))
    loss = losses.mean() if reduction == "mean" else losses.sum() if reduction == "sum" else losses
    with torch.no_grad():
        rewards = beta * logratio

        def masked_mean(x, m):
            return (x * m).sum() / m.sum().clamp(min=1)
        d, u = labels.to(logps.dtype), (~labels).to(logps.dtype)
        metrics = {"rewards/chosen": masked_mean(rewards, d), "rewards/rejected": masked_mean(rewards, u),
                   "rewards/margins": masked_mean(rewards, d) - masked_mean(rewards, u),
                   "logps/chosen": masked_mean(logps, d), "logps/rejected": masked_mean(logps, u),
                   "kl": z0.detach()}
    return loss, metrics
