"""Preference losses as plain torch on per-sequence tensors [B].

Adding a loss = one function decorated with @register + one test parameter. A loss function
receives a `Pairs` (policy and reference sequence log-probabilities, token counts and the
hyperparameters) and returns the per-pair loss [B]; autograd does the chain rule back into the
fused kernel's per-token gradient. Formulas follow TRL (DPOTrainer, CPOTrainer, ORPOTrainer).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F


@dataclass
class Pairs:
    chosen: torch.Tensor                 # policy sum log-prob of each chosen sequence [B]
    rejected: torch.Tensor               # policy sum log-prob of each rejected sequence [B]
    ref_chosen: torch.Tensor | None      # reference sum log-probs [B] (None: reference-free)
    ref_rejected: torch.Tensor | None
    chosen_len: torch.Tensor             # completion tokens per sequence [B] (float, clamped >= 1)
    rejected_len: torch.Tensor
    beta: float
    label_smoothing: float = 0.0
    params: dict = field(default_factory=dict)   # loss-specific (discopop_tau, gamma, alpha, ...)
    kl_chosen: torch.Tensor | None = None     # exact vocabulary KL(p_ref || p_theta) summed over
    kl_rejected: torch.Tensor | None = None   # each sequence's tokens [B] (EXPO, expo_kl="vocab")
    nll: torch.Tensor | None = None           # TRL's NLL term (0-dim): mean cross-entropy over the
                                              # batch's chosen tokens (or nll_targets), see api.py

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

    def averaged(self):
        """The same pairs with every sequence log-prob (policy and reference) divided by its length:
        `average_log_prob=True` (Liger's convention for its DPO losses and KTO)."""
        div = lambda x, n: None if x is None else x / n  # noqa: E731
        return replace(self, chosen=self.chosen_avg, rejected=self.rejected_avg,
                       ref_chosen=div(self.ref_chosen, self.chosen_len),
                       ref_rejected=div(self.ref_rejected, self.rejected_len))


@dataclass(frozen=True)
class LossSpec:
    fn: object
    needs_ref: bool
    params: dict          # loss-specific parameter -> default
    rewards: str          # how the logged rewards are formed: "ratio" | "sum" | "avg"
    smoothing: bool       # takes label_smoothing
    normalised: bool      # already length-normalises (average_log_prob would divide twice)
    beta_zero: bool = False   # beta = 0 is a meaningful limit (EXPO's lambda -> 0; a loss that ignores beta)
    decomposable: bool = True  # each pair's gradient depends on the others only through the reduction
    # (every loss is linear in Pairs.nll, the batch's NLL term: the gradients-in-forward path relies on it)


LOSSES: dict[str, LossSpec] = {}
NLL_LOSSES = {"sft", "cpo", "orpo"}     # the losses with TRL's NLL term (Pairs.nll)


def register(name, *, needs_ref=True, params=None, rewards="ratio", smoothing=False, normalised=False,
             beta_zero=False, decomposable=True):
    def deco(fn):
        LOSSES[name] = LossSpec(fn, needs_ref, dict(params or {}), rewards, smoothing, normalised, beta_zero,
                                decomposable)
        return fn
    return deco


def _smoothed_sigmoid(x, ls):
    """-(1 - ls) * logsigmoid(x) - ls * logsigmoid(-x)   (cDPO label smoothing)."""
    return -F.logsigmoid(x) * (1 - ls) - F.logsigmoid(-x) * ls


@register("sigmoid", smoothing=True)
def sigmoid(p: Pairs):
    return _smoothed_sigmoid(p.beta * p.margin, p.label_smoothing)


@register("hinge")
def hinge(p: Pairs):
    return torch.relu(1 - p.beta * p.margin)


@register("ipo", normalised=True)
def ipo(p: Pairs):
    delta = p.chosen_logratio / p.chosen_len - p.rejected_logratio / p.rejected_len
    return (delta - 1 / (2 * p.beta)) ** 2


@register("exo_pair", smoothing=True)
def exo_pair(p: Pairs):
    eps, x = p.label_smoothing, p.beta * p.margin
    return (torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps))
            + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps)))


@register("nca_pair")
def nca_pair(p: Pairs):
    c, r = p.beta * p.chosen_logratio, p.beta * p.rejected_logratio
    return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


@register("robust", smoothing=True)
def robust(p: Pairs):
    x, ls = p.beta * p.margin, p.label_smoothing
    return (-(1 - ls) * F.logsigmoid(x) + ls * F.logsigmoid(-x)) / (1 - 2 * ls)


@register("bco_pair")
def bco_pair(p: Pairs):
    return -F.logsigmoid(p.beta * p.chosen_logratio) - F.logsigmoid(-p.beta * p.rejected_logratio)


@register("sppo_hard")
def sppo_hard(p: Pairs):
    return (p.chosen_logratio - 0.5 / p.beta) ** 2 + (p.rejected_logratio + 0.5 / p.beta) ** 2


@register("aot", smoothing=True, decomposable=False)
def aot(p: Pairs):
    # couples the batch: sorted policy log-ratios against sorted reference log-ratios
    delta = torch.sort(p.chosen - p.rejected).values - torch.sort(p.ref_chosen - p.ref_rejected).values
    return _smoothed_sigmoid(p.beta * delta, p.label_smoothing)


@register("aot_unpaired", smoothing=True, decomposable=False)
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


@register("sft", needs_ref=False, beta_zero=True)
def sft(p: Pairs):
    return p.nll.expand_as(p.chosen)


@register("sigmoid_norm", normalised=True)
def sigmoid_norm(p: Pairs):
    delta = p.chosen_logratio / p.chosen_len - p.rejected_logratio / p.rejected_len
    return -F.logsigmoid(p.beta * delta)


# ---- reference-free losses (TRL's CPOTrainer / ORPOTrainer) -------------------------------

@register("simpo", needs_ref=False, params={"gamma": 0.5}, rewards="avg", smoothing=True, normalised=True)
def simpo(p: Pairs):
    # length-averaged log-probs, target margin gamma (TRL: simpo_gamma / beta inside the beta scale)
    x = p.beta * (p.chosen_avg - p.rejected_avg) - p.params["gamma"]
    return _smoothed_sigmoid(x, p.label_smoothing)


@register("cpo", needs_ref=False, params={"alpha": 1.0}, rewards="sum", smoothing=True)
def cpo(p: Pairs):
    return _smoothed_sigmoid(p.beta * (p.chosen - p.rejected), p.label_smoothing) + p.params["alpha"] * p.nll


@register("orpo", needs_ref=False, rewards="avg", normalised=True)
def orpo(p: Pairs):
    # odds ratio of the length-averaged log-probs; beta is ORPO's lambda; plus NLL on chosen
    c, r = p.chosen_avg, p.rejected_avg
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    return -p.beta * F.logsigmoid(log_odds) + p.nll


def log1mexp(x):
    """log(1 - e^x) for x <= 0, stable at both ends (Maechler): log(-expm1(x)) for x > -ln 2, else
    log1p(-e^x). x is clamped below 0 by the dtype's smallest normal number, so that a sequence of
    probability 1 (x = 0, e.g. a one-word vocabulary) gives a large finite value, not inf/NaN."""
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# ---- EXPO / TYPO (Hu, He, Wipf: arXiv 2407.09072, 2506.07492) -----------------------------

EXPO_PARAMS = {"expo_kl_on": "both", "expo_kl": "vocab"}


def expo(p: Pairs):
    """softplus(-(log pi(y_w) - log pi(y_l)))  +  beta * KL(pi_ref || pi_theta).

    The supervised Bradley-Terry term uses the policy's own log-probabilities (no reference);
    beta is the paper's lambda (0: the pure Bradley-Terry limit). The KL term per sequence is either
    the exact vocabulary KL summed over its tokens (expo_kl="vocab") or, with expo_kl="sequence",
    k1(y) = log pi_ref(y) - log pi_theta(y) of the given response y (summed token log-probs). k1 is
    an unbiased Monte-Carlo estimate of the sequence-level KL(pi_ref || pi_theta) only when y is a
    sample of pi_ref(. | x): then E[k1] = KL and E[grad k1] = grad KL (0 at pi_theta = pi_ref). For
    responses from elsewhere (preference data) it is no divergence: it can be negative, and at
    pi_theta = pi_ref its gradient is -grad log pi_theta(y), a likelihood term pushing log pi_theta(y)
    up. It is averaged over the sequences named by expo_kl_on; per pair, "both" contributes the mean
    of its two sequences.
    """
    avg = p.params.get("average_log_prob", False)   # the supervised term only; the KL stays summed
    c, r = (p.chosen_avg, p.rejected_avg) if avg else (p.chosen, p.rejected)
    sup = F.softplus(-(c - r))
    if p.params["expo_kl"] == "vocab":
        kc, kr = p.kl_chosen, p.kl_rejected
    else:
        kc, kr = p.ref_chosen - p.chosen, p.ref_rejected - p.rejected
    on = p.params["expo_kl_on"]
    kl = kc if on == "chosen" else kr if on == "rejected" else 0.5 * (kc + kr)
    return sup + p.beta * kl


LOSSES["expo"] = LossSpec(expo, True, dict(EXPO_PARAMS), "sum", False, False, beta_zero=True)
LOSSES["typo"] = LOSSES["expo"]


def is_real(value) -> bool:
    """A real number: Python's or NumPy's int or float (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def _real(name, value, *, low=None, low_open=False):
    if not is_real(value) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite float, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    return float(value)


def check_loss_args(loss_types, loss_weights, label_smoothing, beta, extra: dict, average_log_prob=False):
    """Validates the loss configuration; returns (types, weights, params)."""
    types = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    if not types:
        raise ValueError("loss_type must name at least one loss")
    for t in types:
        if not isinstance(t, str) or t not in LOSSES:
            raise ValueError(f"unknown loss_type {t!r}; valid names: {', '.join(sorted(LOSSES))}")
    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        weights = [_real("loss_weights entry", w) for w in loss_weights]
        if len(weights) != len(types):
            raise ValueError(f"loss_weights has {len(weights)} entries but loss_type names {len(types)} losses")
    zero_ok = all(LOSSES[t].beta_zero for t in types)
    if not is_real(beta) or not math.isfinite(beta) or not (beta >= 0 if zero_ok else beta > 0):
        if zero_ok:
            raise ValueError(f"beta must be a finite float >= 0, got {beta!r}")
        raise ValueError(f"beta must be a positive finite float, got {beta!r}"
                         + (" (beta = 0 is allowed for expo/typo alone)" if beta == 0 else ""))
    label_smoothing = _real("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5], got {label_smoothing}")
    if label_smoothing and not any(LOSSES[t].smoothing for t in types):
        users = sorted(k for k, v in LOSSES.items() if v.smoothing)
        raise ValueError(f"label_smoothing={label_smoothing} has no effect on loss_type {types}; it is used by "
                         f"{', '.join(users)}")
    if "exo_pair" in types and label_smoothing == 0:
        raise ValueError("loss_type 'exo_pair' needs label_smoothing > 0 (it is EXO's epsilon, e.g. 1e-3)")
    if "robust" in types and label_smoothing == 0.5:
        raise ValueError("loss_type 'robust' needs label_smoothing < 0.5 (it divides by 1 - 2 * label_smoothing)")
    if not isinstance(average_log_prob, bool):
        raise TypeError(f"average_log_prob must be a bool, got {type(average_log_prob).__name__}")
    if average_log_prob:
        twice = [t for t in types if LOSSES[t].normalised]
        if twice:
            raise ValueError(f"average_log_prob=True: loss_type {twice} already length-normalises its "
                             "log-probs (leave average_log_prob False)")
    known = {k: v for t in types for k, v in LOSSES[t].params.items()}
    unknown = set(extra) - set(known)
    if unknown:
        raise TypeError(f"unexpected loss parameter(s) {sorted(unknown)} for loss_type {types}; "
                        f"accepted: {sorted(known) or 'none'}")
    params = {**known, **extra, "average_log_prob": average_log_prob}
    if params.get("expo_kl_on", "both") not in ("both", "chosen", "rejected"):
        raise ValueError(f"expo_kl_on must be 'both', 'chosen' or 'rejected', got {params['expo_kl_on']!r}")
    if params.get("expo_kl", "vocab") not in ("vocab", "sequence"):
        raise ValueError(f"expo_kl must be 'vocab' or 'sequence', got {params['expo_kl']!r}")
    if "discopop_tau" in params:
        params["discopop_tau"] = _real("discopop_tau", params["discopop_tau"], low=0, low_open=True)
    if "gamma" in params:   # SimPO's target reward margin
        params["gamma"] = _real("gamma", params["gamma"], low=0)
    if "alpha" in params:   # CPO's NLL weight
        params["alpha"] = _real("alpha", params["alpha"], low=0)
    return types, weights, params
