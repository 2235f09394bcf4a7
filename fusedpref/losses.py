"""Preference losses as plain torch on per-sequence tensors [B].

Adding a loss = one function decorated with @register + one test parameter. A loss function
receives a `Pairs` (policy and reference sequence log-probabilities, token counts and the
hyperparameters) and returns the per-pair loss [B]; autograd does the chain rule back into the
fused kernel's per-token gradient. Formulas follow TRL (DPOTrainer, CPOTrainer, ORPOTrainer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Pairs:
    chosen: torch.Tensor                 # policy sum log-prob of each chosen sequence [B]
    rejected: torch.Tensor               # policy sum log-prob of each rejected sequence [B]
    ref_chosen: torch.Tensor | None      # reference sum log-probs [B] (None: reference-free)
    ref_rejected: torch.Tensor | None
    chosen_len: torch.Tensor             # completion tokens per sequence [B] (float, >= 1)
    rejected_len: torch.Tensor
    beta: float
    label_smoothing: float = 0.0
    params: dict = field(default_factory=dict)   # loss-specific (discopop_tau, gamma, alpha, ...)
    kl_chosen: torch.Tensor | None = None     # exact vocabulary KL(p_ref || p_theta) summed over
    kl_rejected: torch.Tensor | None = None   # each sequence's tokens [B] (EXPO, expo_kl="vocab")

    # The log-ratios of TRL's DPO losses (policy minus reference)
    @property
    def chosen_logratio(self):
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratio(self):
        return self.rejected - self.ref_rejected

    @property
    def margin(self):           # "logits" in TRL: (pi_c - pi_r) - (ref_c - ref_r)
        return self.chosen_logratio - self.rejected_logratio

    @property
    def chosen_avg(self):
        return self.chosen / self.chosen_len

    @property
    def rejected_avg(self):
        return self.rejected / self.rejected_len

    def nll(self):
        """TRL's NLL term: mean cross-entropy over all chosen completion tokens of the batch."""
        return -self.chosen.sum() / self.chosen_len.sum()


@dataclass(frozen=True)
class LossSpec:
    fn: object
    needs_ref: bool
    params: dict          # loss-specific parameter -> default
    rewards: str          # how the logged rewards are formed: "ratio" | "sum" | "avg"


LOSSES: dict[str, LossSpec] = {}


def register(name, *, needs_ref=True, params=None, rewards="ratio"):
    def deco(fn):
        LOSSES[name] = LossSpec(fn, needs_ref, dict(params or {}), rewards)
        return fn
    return deco


def _smoothed_sigmoid(x, ls):
    """-(1 - ls) * logsigmoid(x) - ls * logsigmoid(-x)   (cDPO label smoothing)."""
    return -F.logsigmoid(x) * (1 - ls) - F.logsigmoid(-x) * ls


@register("sigmoid")
def sigmoid(p: Pairs):
    return _smoothed_sigmoid(p.beta * p.margin, p.label_smoothing)


@register("hinge")
def hinge(p: Pairs):
    return torch.relu(1 - p.beta * p.margin)


@register("ipo")
def ipo(p: Pairs):
    delta = p.chosen_logratio / p.chosen_len - p.rejected_logratio / p.rejected_len
    return (delta - 1 / (2 * p.beta)) ** 2


@register("exo_pair")
def exo_pair(p: Pairs):
    eps, x = p.label_smoothing, p.beta * p.margin
    return (torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps))
            + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps)))


@register("nca_pair")
def nca_pair(p: Pairs):
    c, r = p.beta * p.chosen_logratio, p.beta * p.rejected_logratio
    return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


@register("robust")
def robust(p: Pairs):
    x, ls = p.beta * p.margin, p.label_smoothing
    return (-(1 - ls) * F.logsigmoid(x) + ls * F.logsigmoid(-x)) / (1 - 2 * ls)


@register("bco_pair")
def bco_pair(p: Pairs):
    return -F.logsigmoid(p.beta * p.chosen_logratio) - F.logsigmoid(-p.beta * p.rejected_logratio)


@register("sppo_hard")
def sppo_hard(p: Pairs):
    return (p.chosen_logratio - 0.5 / p.beta) ** 2 + (p.rejected_logratio + 0.5 / p.beta) ** 2


@register("aot")
def aot(p: Pairs):
    # couples the batch: sorted policy log-ratios against sorted reference log-ratios
    delta = torch.sort(p.chosen - p.rejected).values - torch.sort(p.ref_chosen - p.ref_rejected).values
    return _smoothed_sigmoid(p.beta * delta, p.label_smoothing)


@register("aot_unpaired")
def aot_unpaired(p: Pairs):
    delta = torch.sort(p.chosen_logratio).values - torch.sort(p.rejected_logratio).values
    return _smoothed_sigmoid(p.beta * delta, p.label_smoothing)


@register("apo_zero")
def apo_zero(p: Pairs):
    return 1 - torch.sigmoid(p.beta * p.chosen_logratio) + torch.sigmoid(p.beta * p.rejected_logratio)


@register("apo_down")
def apo_down(p: Pairs):
    return torch.sigmoid(p.beta * p.chosen_logratio) + 1 - torch.sigmoid(p.beta * p.margin)


@register("discopop", params={"discopop_tau": 0.05})
def discopop(p: Pairs):
    x = p.beta * p.margin
    mod = torch.sigmoid(x / p.params["discopop_tau"])
    return -F.logsigmoid(x) * (1 - mod) + torch.exp(-x) * mod


@register("sft", needs_ref=False)
def sft(p: Pairs):
    return p.nll().expand_as(p.chosen)


@register("sigmoid_norm")
def sigmoid_norm(p: Pairs):
    delta = p.chosen_logratio / p.chosen_len - p.rejected_logratio / p.rejected_len
    return -F.logsigmoid(p.beta * delta)


# ---- reference-free losses (TRL's CPOTrainer / ORPOTrainer) -------------------------------

@register("simpo", needs_ref=False, params={"gamma": 0.5}, rewards="avg")
def simpo(p: Pairs):
    # length-averaged log-probs, target margin gamma (TRL: simpo_gamma / beta inside the beta scale)
    x = p.beta * (p.chosen_avg - p.rejected_avg) - p.params["gamma"]
    return _smoothed_sigmoid(x, p.label_smoothing)


@register("cpo", needs_ref=False, params={"alpha": 1.0}, rewards="sum")
def cpo(p: Pairs):
    return _smoothed_sigmoid(p.beta * (p.chosen - p.rejected), p.label_smoothing) + p.params["alpha"] * p.nll()


@register("orpo", needs_ref=False, rewards="avg")
def orpo(p: Pairs):
    # odds ratio of the length-averaged log-probs; beta is ORPO's lambda; plus NLL on chosen
    c, r = p.chosen_avg, p.rejected_avg
    log_odds = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
    return -p.beta * F.logsigmoid(log_odds) + p.nll()


# ---- EXPO / TYPO (Hu, He, Wipf: arXiv 2407.09072, 2506.07492) -----------------------------

EXPO_PARAMS = {"average_log_prob": False, "expo_kl_on": "both", "expo_kl": "vocab"}


def expo(p: Pairs):
    """softplus(-(log pi(y_w) - log pi(y_l)))  +  beta * KL(pi_ref || pi_theta).

    The supervised Bradley-Terry term uses the policy's own log-probabilities (no reference);
    beta is the paper's lambda. The KL term per sequence is either the exact vocabulary KL summed
    over its tokens (expo_kl="vocab") or the sample estimate log pi_ref(y) - log pi_theta(y)
    (expo_kl="sequence", valid when y is drawn from the reference). It is averaged over the
    sequences named by expo_kl_on; per pair, "both" contributes the mean of its two sequences.
    """
    avg = p.params["average_log_prob"]
    c, r = (p.chosen_avg, p.rejected_avg) if avg else (p.chosen, p.rejected)
    sup = F.softplus(-(c - r))
    if p.params["expo_kl"] == "vocab":
        kc, kr = p.kl_chosen, p.kl_rejected
    else:
        kc, kr = p.ref_chosen - p.chosen, p.ref_rejected - p.rejected
    on = p.params["expo_kl_on"]
    kl = kc if on == "chosen" else kr if on == "rejected" else 0.5 * (kc + kr)
    return sup + p.beta * kl


LOSSES["expo"] = LossSpec(expo, True, dict(EXPO_PARAMS), "sum")
LOSSES["typo"] = LOSSES["expo"]


def check_loss_args(loss_types, loss_weights, label_smoothing, beta, extra: dict):
    """Validates the loss configuration; returns (types, weights, params)."""
    types = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    if not types:
        raise ValueError("loss_type must name at least one loss")
    for t in types:
        if t not in LOSSES:
            raise ValueError(f"unknown loss_type {t!r}; valid names: {', '.join(sorted(LOSSES))}")
    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        weights = [float(w) for w in loss_weights]
        if len(weights) != len(types):
            raise ValueError(f"loss_weights has {len(weights)} entries but loss_type names {len(types)} losses")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a positive finite float, got {beta!r}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5], got {label_smoothing}")
    if "exo_pair" in types and label_smoothing == 0:
        raise ValueError("loss_type 'exo_pair' needs label_smoothing > 0 (it is EXO's epsilon, e.g. 1e-3)")
    if "robust" in types and label_smoothing == 0.5:
        raise ValueError("loss_type 'robust' needs label_smoothing < 0.5 (it divides by 1 - 2 * label_smoothing)")
    known = {k: v for t in types for k, v in LOSSES[t].params.items()}
    unknown = set(extra) - set(known)
    if unknown:
        raise TypeError(f"unexpected loss parameter(s) {sorted(unknown)} for loss_type {types}; "
                        f"accepted: {sorted(known) or 'none'}")
    params = {**known, **extra}
    if params.get("expo_kl_on", "both") not in ("both", "chosen", "rejected"):
        raise ValueError(f"expo_kl_on must be 'both', 'chosen' or 'rejected', got {params['expo_kl_on']!r}")
    if params.get("expo_kl", "vocab") not in ("vocab", "sequence"):
        raise ValueError(f"expo_kl must be 'vocab' or 'sequence', got {params['expo_kl']!r}")
    if "discopop_tau" in params and not params["discopop_tau"] > 0:
        raise ValueError(f"discopop_tau must be > 0, got {params['discopop_tau']}")
    return types, weights, params
