"""The eager oracle: full logits, one copy shared by tests and the benchmark.

eager_logprobs(...) run on float64 copies of the inputs is the float64 oracle; run on the
inputs as they are it is "eager PyTorch in the same dtype" (TRL's way: logits in the input
dtype, upcast to fp32 before log_softmax).
"""
from __future__ import annotations

import math

import torch


def eager_logits(hidden, weight, bias=None, softcap=None, logit_scale=None):
    """softcap(hidden @ weight.T + bias) * logit_scale, upcast to fp32 (float64 stays)."""
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = z.float() if z.dtype != torch.float64 else z
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if logit_scale is not None:
        z = z * logit_scale
    return z


def eager_logprobs(hidden, weight, targets, bias=None, ignore_index=-100, softcap=None, logit_scale=None):
    z = eager_logits(hidden, weight, bias, softcap, logit_scale)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logp = torch.log_softmax(z, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logp, torch.zeros_like(logp))


def eager_token_stats(hidden, weight, targets, bias=None, ignore_index=-100, softcap=None, logit_scale=None):
    """[..., 4] = (sum of logits over V, entropy, argmax == target, log sum_v p_v^2), 0 on
    ignored rows; differentiable (the hit has no gradient)."""
    z = eager_logits(hidden, weight, bias, softcap, logit_scale)
    valid = (targets != ignore_index).unsqueeze(-1)
    logp = torch.log_softmax(z, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    hit = (z.argmax(-1) == targets).to(z.dtype)
    out = torch.stack([z.sum(-1), entropy, hit, torch.logsumexp(2 * logp, dim=-1)], dim=-1)
    return torch.where(valid, out, torch.zeros_like(out))


def eager_divergence(hidden, weight, ref_hidden, ref_weight, targets, *, beta=0.0, bias=None, ref_bias=None,
                     ignore_index=-100, softcap=None, ref_softcap=None, logit_scale=None, ref_logit_scale=None):
    """Per-token divergence between the policy's p and the reference's q over the vocabulary
    (beta 0: KL(q || p), 1: KL(p || q), between: beta KL(q || m) + (1 - beta) KL(p || m) with
    m = (1 - beta) p + beta q), 0 on ignored rows. Written from full log-softmaxes."""
    lp = torch.log_softmax(eager_logits(hidden, weight, bias, softcap, logit_scale), dim=-1)
    lq = torch.log_softmax(eager_logits(ref_hidden, ref_weight, ref_bias, ref_softcap, ref_logit_scale), dim=-1)
    p, q = lp.exp(), lq.exp()
    if beta == 0:
        div = (q * (lq - lp)).sum(-1)
    elif beta == 1:
        div = (p * (lp - lq)).sum(-1)
    else:
        lm = torch.log((1 - beta) * p + beta * q)
        div = beta * (q * (lq - lm)).sum(-1) + (1 - beta) * (p * (lp - lm)).sum(-1)
    return torch.where(targets != ignore_index, div, torch.zeros_like(div))


def eager_kl(hidden, weight, ref_hidden, ref_weight, targets, bias=None, ref_bias=None,
             ignore_index=-100, softcap=None):
    """Per-token KL(p_ref || p_theta) over the full vocabulary, 0 on ignored rows."""
    lp = torch.log_softmax(eager_logits(hidden, weight, bias, softcap), dim=-1)
    lr = torch.log_softmax(eager_logits(ref_hidden, ref_weight, ref_bias, softcap), dim=-1)
    kl = (lr.exp() * (lr - lp)).sum(-1)
    return torch.where(targets != ignore_index, kl, torch.zeros_like(kl))


def as_float64(*tensors):
    return tuple(None if t is None else t.detach().double().requires_grad_(t.requires_grad)
                 for t in tensors)


# ---------------------------------------------------------------- preference losses, TRL's way
# An independent eager derivation of every loss in fusedpref.losses, written the way TRL's
# trainers compute them (full logits, log_softmax, gather, masked sums, then one if/elif per
# loss type). It shares no code with fusedpref.losses, so tests and the benchmark's error
# column compare two derivations.

def _seq_logps(hidden, weight, bias, targets, ignore_index, softcap, logit_scale=None):
    logits = eager_logits(hidden, weight, bias, softcap, logit_scale)
    mask = targets != ignore_index
    labels = torch.where(mask, targets, torch.zeros_like(targets)).long()
    per_token = torch.gather(logits.log_softmax(-1), -1, labels.unsqueeze(-1)).squeeze(-1)
    return (per_token * mask).sum(-1), logits, mask


def _log1mexp(x):
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _reduce(losses, reduction):
    return losses.mean() if reduction == "mean" else losses.sum() if reduction == "sum" else losses


def eager_preference_loss(hidden, weight, targets, *, loss_type, beta, bias=None, ref_hidden=None,
                          ref_weight=None, ref_bias=None, ref_logps=None, ignore_index=-100, softcap=None,
                          label_smoothing=0.0, loss_weights=None, reduction="mean", average_log_prob=False,
                          nll_targets=None, discopop_tau=0.05, gamma=0.5, alpha=1.0, expo_kl="vocab",
                          expo_kl_on="both", logit_scale=None, ref_softcap="same", ref_logit_scale="same",
                          ld_alpha=None, use_weighting=False):
    """(loss, metrics) of fusedpref.preference_loss, from full logits (logit_scale: the whole multiplier
    after the cap; the reference head's cap and scale default to the policy's). ld_alpha and
    use_weighting as TRL's DPOTrainer computes them (shared/tail masks from completion positions;
    WPO's aligned log-probs from the full softmax)."""
    import torch.nn.functional as F

    ref_softcap = softcap if ref_softcap == "same" else ref_softcap
    ref_logit_scale = logit_scale if ref_logit_scale == "same" else ref_logit_scale
    raw_logps, logits, mask = _seq_logps(hidden, weight, bias, targets, ignore_index, softcap, logit_scale)
    b = raw_logps.shape[0] // 2
    n_tok = mask.sum(-1).to(raw_logps.dtype)
    lens = n_tok.clamp(min=1)
    lp_tok = logits.log_softmax(-1)
    labels = torch.where(mask, targets, torch.zeros_like(targets)).long()

    def per_token(lp):
        return torch.gather(lp, -1, labels.unsqueeze(-1)).squeeze(-1) * mask

    def ld_sum(tok):      # TRL's LD-DPO: shared prefix + ld_alpha * the longer sequence's tail
        pos = mask.long().cumsum(-1)
        shared = torch.minimum(mask[:b].sum(-1), mask[b:].sum(-1)).repeat(2)[:, None]
        return (tok * ((pos > 0) & (pos <= shared))).sum(-1) + ld_alpha * (tok * (pos > shared)).sum(-1)

    logps = raw_logps if ld_alpha is None else ld_sum(per_token(lp_tok))
    ref_lp_tok = None
    if ref_hidden is not None:
        with torch.no_grad():
            ref_logps, ref_logits, _ = _seq_logps(ref_hidden, ref_weight, ref_bias, targets, ignore_index, ref_softcap,
                                                  ref_logit_scale)
            ref_lp_tok = ref_logits.log_softmax(-1)
            if ld_alpha is not None:
                ref_logps = ld_sum(per_token(ref_lp_tok))
    c_sum, r_sum = logps[:b], logps[b:]
    lc, lr = lens[:b], lens[b:]
    pair_w = None
    if use_weighting:     # WPO: exp(mean token (log p(y_t) - log sum_v p(v)^2)), chosen x rejected, no grad
        with torch.no_grad():
            aligned = ((per_token(lp_tok) - torch.logsumexp(2 * lp_tok, -1)) * mask).sum(-1) / lens
            wts = aligned.exp()
            pair_w = wts[:b] * wts[b:]
    if nll_targets is None:
        nll = -raw_logps[:b].sum() / n_tok[:b].sum().clamp(min=1)
    else:
        nt = nll_targets[:b]
        nll_seq, _, nmask = _seq_logps(hidden[:b], weight, bias, nt, ignore_index, softcap, logit_scale)
        nll = -nll_seq.sum() / nmask.sum().clamp(min=1)
    avg = average_log_prob
    c, r = (c_sum / lc, r_sum / lr) if avg else (c_sum, r_sum)
    if ref_logps is not None:
        rc, rr = (ref_logps[:b] / lc, ref_logps[b:] / lr) if avg else (ref_logps[:b], ref_logps[b:])
        chosen_logratios, rejected_logratios = c - rc, r - rr
        logits_ = (c - r) - (rc - rr)
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = loss_weights or [1.0] * len(types)
    ls = label_smoothing
    total, vocab_kl = 0, None
    for t, w in zip(types, weights):
        if t == "sigmoid":
            losses = -F.logsigmoid(beta * logits_) * (1 - ls) - F.logsigmoid(-beta * logits_) * ls
        elif t == "hinge":
            losses = torch.relu(1 - beta * logits_)
        elif t == "ipo":
            losses = ((chosen_logratios / lc - rejected_logratios / lr) - 1 / (2 * beta)) ** 2
        elif t == "exo_pair":
            losses = (beta * logits_).sigmoid() * (F.logsigmoid(beta * logits_) - math.log(1 - ls)) + \
                (-beta * logits_).sigmoid() * (F.logsigmoid(-beta * logits_) - math.log(ls))
        elif t == "nca_pair":
            cr, rrw = chosen_logratios * beta, rejected_logratios * beta
            losses = -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rrw)
        elif t == "robust":
            losses = (-F.logsigmoid(beta * logits_) * (1 - ls) + F.logsigmoid(-beta * logits_) * ls) / (1 - 2 * ls)
        elif t == "bco_pair":
            losses = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-(beta * rejected_logratios))
        elif t == "sppo_hard":
            losses = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
        elif t == "aot":
            d = torch.sort(c - r, dim=0)[0] - torch.sort(rc - rr, dim=0)[0]
            losses = -F.logsigmoid(beta * d) * (1 - ls) - F.logsigmoid(-beta * d) * ls
        elif t == "aot_unpaired":
            d = torch.sort(chosen_logratios, dim=0)[0] - torch.sort(rejected_logratios, dim=0)[0]
            losses = -F.logsigmoid(beta * d) * (1 - ls) - F.logsigmoid(-beta * d) * ls
        elif t == "apo_zero":
            losses = (1 - F.sigmoid(beta * chosen_logratios)) + F.sigmoid(beta * rejected_logratios)
        elif t == "apo_down":
            losses = F.sigmoid(beta * chosen_logratios) + (1 - F.sigmoid(beta * (chosen_logratios - rejected_logratios)))
        elif t == "discopop":
            lg = logits_ * beta
            mod = torch.sigmoid(lg / discopop_tau)
            losses = -F.logsigmoid(lg) * (1 - mod) + torch.exp(-lg) * mod
        elif t == "sft":
            losses = nll.expand(b)
        elif t == "sigmoid_norm":
            losses = -F.logsigmoid(beta * (chosen_logratios / lc - rejected_logratios / lr))
        elif t == "simpo":
            lg = (c / lc - r / lr) - gamma / beta
            losses = -F.logsigmoid(beta * lg) * (1 - ls) - F.logsigmoid(-beta * lg) * ls
        elif t == "cpo":
            lg = c - r
            losses = -F.logsigmoid(beta * lg) * (1 - ls) - F.logsigmoid(-beta * lg) * ls + alpha * nll
        elif t == "orpo":
            ca, ra = c / lc, r / lr
            log_odds = (ca - ra) - (_log1mexp(ca) - _log1mexp(ra))
            losses = nll - beta * F.logsigmoid(log_odds)
        elif t in ("expo", "typo"):
            sc, sr = (c_sum / lc, r_sum / lr) if avg else (c_sum, r_sum)
            sup = F.softplus(-(sc - sr))
            if expo_kl == "vocab":
                kl_seq = ((ref_lp_tok.exp() * (ref_lp_tok - lp_tok)).sum(-1) * mask).sum(-1)
                vocab_kl = kl_seq
            else:
                kl_seq = ref_logps.detach() - logps
            kc, kr = kl_seq[:b], kl_seq[b:]
            kl = kc if expo_kl_on == "chosen" else kr if expo_kl_on == "rejected" else 0.5 * (kc + kr)
            losses = sup + beta * kl
        else:
            raise KeyError(t)
        if pair_w is not None:
            losses = losses * pair_w
        total = total + w * losses
    # metrics, TRL style, from the full logits
    first = types[0]
    if first in ("expo", "typo"):          # EXPO's average_log_prob touches its supervised term only
        c, r = c_sum, r_sum
    if first in ("simpo", "orpo"):
        rwc, rwr = beta * c_sum / lc, beta * r_sum / lr
    elif first in ("cpo", "expo", "typo") or ref_logps is None:
        rwc, rwr = beta * c, beta * r
    else:
        rwc, rwr = beta * (c - rc), beta * (r - rr)
    with torch.no_grad():
        mc, mr = mask[:b].to(logits.dtype), mask[b:].to(logits.dtype)
        ent = -(lp_tok.exp() * lp_tok).sum(-1)
        acc = (logits.argmax(-1) == targets).to(logits.dtype)
        m = mask.to(logits.dtype)
        metrics = {
            "rewards/chosen": rwc.mean(), "rewards/rejected": rwr.mean(),
            "rewards/accuracies": (rwc > rwr).to(logits.dtype).mean(),
            "rewards/margins": (rwc - rwr).mean(),
            "logps/chosen": c.mean(), "logps/rejected": r.mean(),
            "logits/chosen": (logits[:b].mean(-1) * mc).sum() / mc.sum().clamp(min=1),
            "logits/rejected": (logits[b:].mean(-1) * mr).sum() / mr.sum().clamp(min=1),
            "entropy": (ent * m).sum() / m.sum().clamp(min=1),
            "mean_token_accuracy": (acc[:b] * mc).sum() / mc.sum().clamp(min=1),
        }
        if vocab_kl is not None:      # EXPO's exact KL per sequence, averaged over chosen / rejected
            metrics["kl/chosen"], metrics["kl/rejected"] = vocab_kl[:b].mean(), vocab_kl[b:].mean()
    return _reduce(total, reduction), metrics


def eager_kto_loss(hidden, weight, targets, labels, *, beta, ref_hidden=None, ref_weight=None, ref_logps=None,
                   kl_hidden=None, kl_targets=None, ref_kl_hidden=None, desirable_weight=1.0,
                   undesirable_weight=1.0, ignore_index=-100, reduction="mean", average_log_prob=False, bias=None,
                   softcap=None):
    """(loss, metrics) of fusedpref.kto_loss, TRL's KTOTrainer way, from full logits."""
    def seq(h, w, bb, t):
        s, _, m = _seq_logps(h, w, bb, t, ignore_index, softcap)
        return s / m.sum(-1).clamp(min=1) if average_log_prob else s

    logps = seq(hidden, weight, bias, targets)
    _, logits, mask = _seq_logps(hidden, weight, bias, targets, ignore_index, softcap)
    with torch.no_grad():
        ref = seq(ref_hidden, ref_weight, None, targets) if ref_hidden is not None else ref_logps
        if kl_hidden is not None:
            kl = (seq(kl_hidden, weight, bias, kl_targets) - seq(ref_kl_hidden, ref_weight, None, kl_targets))
            kl = kl.mean().clamp(min=0)
        else:
            kl = logps.new_zeros(())
    ch, rj = logps[labels] - ref[labels], logps[~labels] - ref[~labels]
    per = torch.empty_like(logps)
    per[labels] = desirable_weight * (1 - torch.sigmoid(beta * (ch - kl)))
    per[~labels] = undesirable_weight * (1 - torch.sigmoid(beta * (kl - rj)))
    with torch.no_grad():
        rw = beta * (logps - ref)
        metrics = {"rewards/chosen": rw[labels].mean(), "rewards/rejected": rw[~labels].mean(),
                   "rewards/margins": rw[labels].mean() - rw[~labels].mean(),
                   "logps/chosen": logps[labels].mean(), "logps/rejected": logps[~labels].mean(), "kl": kl}
        lp_tok = logits.log_softmax(-1)
        ent, mean_logit = -(lp_tok.exp() * lp_tok).sum(-1), logits.mean(-1)
        metrics["entropy"] = ent[mask].mean() if mask.any() else ent.new_zeros(())
        for name, rows in (("logits/chosen", labels), ("logits/rejected", ~labels)):
            m = mask[rows]
            metrics[name] = mean_logit[rows][m].mean() if m.any() else ent.new_zeros(())
    return _reduce(per, reduction), metrics
