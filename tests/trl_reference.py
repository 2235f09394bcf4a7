"""An independent eager reference of the preference losses, written the way TRL's trainers
compute them (full logits, log_softmax, gather, masked sums, then one if/elif per loss type).
It shares no loss code with fusedpref.losses, so the tests compare two derivations."""
import math

import torch
import torch.nn.functional as F

from fusedpref.reference import eager_logits


def _batch_logps(hidden, weight, bias, targets, ignore_index, softcap):
    logits = eager_logits(hidden, weight, bias, softcap)
    mask = targets != ignore_index
    labels = torch.where(mask, targets, torch.zeros_like(targets))
    per_token = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
    return (per_token * mask).sum(-1), logits, mask


def trl_loss(hidden, weight, targets, *, loss_type, beta, bias=None, ref_hidden=None, ref_weight=None,
             ref_bias=None, ref_logps=None, ignore_index=-100, softcap=None, label_smoothing=0.0,
             loss_weights=None, discopop_tau=0.05, gamma=0.5, alpha=1.0):
    logps, logits, mask = _batch_logps(hidden, weight, bias, targets, ignore_index, softcap)
    b = logps.shape[0] // 2
    lens = mask.sum(-1).to(logps.dtype).clamp(min=1)
    if ref_hidden is not None:
        with torch.no_grad():
            ref_logps, _, _ = _batch_logps(ref_hidden, ref_weight, ref_bias, targets, ignore_index, softcap)
    c, r = logps[:b], logps[b:]
    lc, lr = lens[:b], lens[b:]
    nll = -c.sum() / lc.sum()
    if ref_logps is not None:
        rc, rr = ref_logps[:b], ref_logps[b:]
        chosen_logratios, rejected_logratios = c - rc, r - rr
        logits_ = (c - r) - (rc - rr)
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    weights = loss_weights or [1.0] * len(types)
    ls = label_smoothing
    total = 0
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
            log_odds = (ca - ra) - (torch.log1p(-torch.exp(ca)) - torch.log1p(-torch.exp(ra)))
            losses = nll - beta * F.logsigmoid(log_odds)
        else:
            raise KeyError(t)
        total = total + w * losses
    # metrics, TRL style, from the full logits
    first = types[0]
    if first in ("simpo", "orpo"):
        rwc, rwr = beta * c / lc, beta * r / lr
    elif first == "cpo" or ref_logps is None:
        rwc, rwr = beta * c, beta * r
    else:
        rwc, rwr = beta * (c - rc), beta * (r - rr)
    with torch.no_grad():
        mc, mr = mask[:b].to(logits.dtype), mask[b:].to(logits.dtype)
        lp = logits.log_softmax(-1)
        ent = -(lp.exp() * lp).sum(-1)
        acc = (logits.argmax(-1) == targets).to(logits.dtype)
        m = mask.to(logits.dtype)
        metrics = {
            "rewards/chosen": rwc.mean(), "rewards/rejected": rwr.mean(),
            "rewards/accuracies": (rwc > rwr).to(logits.dtype).mean(),
            "rewards/margins": (rwc - rwr).mean(),
            "logps/chosen": c.mean(), "logps/rejected": r.mean(),
            "logits/chosen": (logits[:b].mean(-1) * mc).sum() / mc.sum(),
            "logits/rejected": (logits[b:].mean(-1) * mr).sum() / mr.sum(),
            "entropy": (ent * m).sum() / m.sum(),
            "mean_token_accuracy": (acc[:b] * mc).sum() / mc.sum(),
        }
    return total.mean(), metrics
