"""fusedpref under TRL (>= 1.16): its fused heads replaced, and EXPO in DPOTrainer.

    import fusedpref.integrations.trl as fp_trl
    fp_trl.patch_trl()          # before or after the trainer is built; unpatch_trl() undoes it

After `patch_trl()`:

- TRL's per-token head (`trl.kernels.ChunkedLogProbFunction`, which `add_fused_lm_head` calls
  for DPOTrainer, KTOTrainer, SFTTrainer, GRPOTrainer, RLOOTrainer, ...) is `FusedLogProbHead`:
  the same `apply` signature and outputs (log_probs, entropy, log_sum_sq_probs, mean_logits,
  is_top1), computed by `LinearLogProbs` with its statistics. The entropy is differentiable (an
  entropy bonus's gradient -p (log p + H) comes from the same backward recompute); as in TRL,
  log_sum_sq_probs, mean_logits and is_top1 are not. Nothing falls back to TRL.
- TRL's divergence (`trl.kernels.chunked_divergence.ChunkedDivergenceFunction`, used by
  DistillationTrainer) is `FusedDivergence`, computed by `LinearDivergence`: beta 0 forward KL,
  1 reverse KL, between the generalised JSD; temperature, per-model logit scale and soft-cap;
  the student's entropy as a statistic.
- `DPOConfig(loss_type="expo", beta=lambda)` (also in a list with `loss_weights`) trains EXPO
  (fusedpref.preference_loss) with the exact vocabulary KL(pi_ref || pi_theta): the policy's and
  the reference's last hidden states go through `LinearLogProbsKL` (one pass over both heads).
  The reference is `ref_model`, or the policy with its adapters disabled under PEFT (as TRL
  does). `precompute_ref_log_probs=True` raises when the trainer is built: the exact KL needs the
  reference's hidden states, and the dataset's responses are not samples of pi_ref, so their
  precomputed log-probs estimate no divergence. TRL's metric names are logged, plus kl/chosen and
  kl/rejected.
- A PEFT adapter on the LM head itself (LoRA & co. with `lm_head` in `target_modules`) raises a
  clear error at the first fused forward: TRL's fused head reads `lm_head.weight`, the frozen base
  weight, and the adapter's low-rank term would be silently missing (`modules_to_save=["lm_head"]`,
  a trainable full copy, is read correctly).

TRL's logits are softcap(s (h W^T + b)) / T for a logit scale s, a soft-cap c and a temperature
T; fusedpref's are softcap'(h W^T + b) * scale, so the cap is c / |s| and the scale s / T.

Distributed weights: TRL gathers an FSDP2 DTensor head with `full_tensor()` before calling a
head, and so do these (a DTensor reaching them is gathered once; its gradient is reduce-scattered
and averaged over the mesh, as FSDP2 reduces every parameter's, where TRL's assumes it identical
on every rank). Under DeepSpeed ZeRO-3 TRL
gathers the partitioned head with `maybe_gather_lm_head_ctx`; `patch_trl()` registers it with
fusedpref.functions.set_weight_gather, so fusedpref's backward recompute gathers too, and
`FusedDivergence` gathers in its forward as TRL's function does.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import inspect
import logging
import re

import torch

from .. import functions
from ..api import kto_loss, preference_loss
from ..functions import LinearDivergence, LinearLogProbs

logger = logging.getLogger("fusedpref.integrations.trl")

_PATCHES: list = []          # (object, attribute, original) in the order they were applied


class HeadCapture:
    """Takes over the one call of TRL's fused head inside a model forward whose output is discarded:
    `compute(hidden [2B, T-1, D], the head call's inputs)` runs there, inside the model's forward,
    where the head's weight is materialised (gathered under ZeRO-3 by TRL's caller, unsharded under
    FSDP), and its result is kept (`result`). The head then returns NaN-filled outputs of the right
    shapes, never plausible numbers: any use of that forward's result shows. Active only inside
    `_capturing()`; a second head call in one capture raises."""

    def __init__(self, labels, compute):
        self.labels, self.compute = labels, compute
        self.call = self.result = None

    def record(self, outputs, **inputs):
        if self.call is not None:
            raise RuntimeError("fusedpref's TRL loss path expected one call of TRL's fused LM head in the model's "
                               "forward, saw two")
        self.call = inputs
        self.result = self.compute(_sequence_rows(inputs["hidden"], self.labels), inputs)
        h = inputs["hidden"]
        nan = h.new_full((h.shape[0],), float("nan"), dtype=torch.float32)
        return (nan, *(nan if k in outputs else None for k in ("entropy", "log_sum_sq_probs", "mean_logits")),
                torch.zeros(h.shape[0], dtype=torch.bool, device=h.device) if "is_top1" in outputs else None)


_CAPTURE: contextvars.ContextVar = contextvars.ContextVar("fusedpref_trl_capture", default=None)


def _full(t):
    """A DTensor gathered once (FSDP2: its gradient reduce-scattered and averaged, as FSDP2 reduces
    every parameter's; fusedpref._dtensor.gather), anything else unchanged."""
    from .._dtensor import gather

    return gather(t)


def _transform(logit_scale, softcap, temperature, what="logit_scale"):
    """TRL's (logit_scale s, soft-cap c, temperature T) -> fusedpref's (cap c / |s|, scale s / T)."""
    s = 1.0 if logit_scale is None else float(logit_scale)
    if s == 0:
        raise ValueError(f"{what}=0 makes every logit 0 (a uniform distribution); fusedpref's heads need a "
                         "nonzero logit scale")
    if temperature is None or not temperature > 0:
        raise ValueError(f"temperature must be a positive float, got {temperature}")
    cap = None if softcap is None else float(softcap) / abs(s)
    scale = s / float(temperature)
    return cap, (None if scale == 1.0 else scale)


class FusedLogProbHead:
    """Drop-in for `trl.kernels.ChunkedLogProbFunction` (same `apply` signature and outputs)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        weight, bias = _full(weight), None if bias is None else _full(bias)
        capture = _CAPTURE.get()
        if capture is not None:       # the EXPO path only wants the head's inputs (HeadCapture)
            return capture.record(outputs, hidden=hidden, weight=weight, bias=bias, targets=targets,
                                  temperature=temperature, softcap=final_logit_softcapping, logit_scale=logit_scale)
        cap, scale = _transform(logit_scale, final_logit_softcapping, temperature)
        want_stats = any(k in outputs for k in ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
        logp, stats = LinearLogProbs.apply(hidden, weight, targets, bias, -100, cap, "auto", want_stats, scale)
        entropy = stats[:, 1] if "entropy" in outputs else None
        # as TRL's: only the log-probs and the entropy carry gradients
        log_sum_sq = stats[:, 3].detach() if "log_sum_sq_probs" in outputs else None
        mean_logits = stats[:, 0].detach() / weight.shape[0] if "mean_logits" in outputs else None
        is_top1 = stats[:, 2].detach() > 0.5 if "is_top1" in outputs else None
        return logp, entropy, log_sum_sq, mean_logits, is_top1


class FusedDivergence:
    """Drop-in for `trl.kernels.chunked_divergence.ChunkedDivergenceFunction`: per-token divergence
    between the student (gradient) and the teacher, and the student's entropy (a statistic)."""

    @staticmethod
    def apply(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, beta,
              temperature=1.0, student_logit_scale=1.0, student_final_logit_softcapping=None,
              teacher_logit_scale=1.0, teacher_final_logit_softcapping=None):
        sw, sb = _full(student_weight), None if student_bias is None else _full(student_bias)
        tw, tb = _full(teacher_weight), None if teacher_bias is None else _full(teacher_bias)
        cap, scale = _transform(student_logit_scale, student_final_logit_softcapping, temperature,
                                "student_logit_scale")
        ref_cap, ref_scale = _transform(teacher_logit_scale, teacher_final_logit_softcapping, temperature,
                                        "teacher_logit_scale")
        rows = torch.zeros(student_hidden.shape[0], dtype=torch.long, device=student_hidden.device)
        with functions.gathered(sw, sb, tw, tb):
            div, stats = LinearDivergence.apply(student_hidden, sw, teacher_hidden, tw, rows, sb, tb, -100, "auto",
                                                float(beta), cap, ref_cap, scale, ref_scale, True)
        return div, stats[:, 1].detach()


# ---------------------------------------------------------------- EXPO in DPOTrainer

@contextlib.contextmanager
def _capturing(labels, compute):
    """Within it, FusedLogProbHead hands its inputs to compute instead of computing (HeadCapture)."""
    capture = HeadCapture(labels, compute)
    token = _CAPTURE.set(capture)
    try:
        yield capture
    finally:
        _CAPTURE.reset(token)


def _sequence_rows(h, labels):
    """The head's rows as [2B, T-1, D]: TRL passes every position (without Triton) or only the
    valid ones (on Triton devices)."""
    mask = labels[:, 1:] != -100
    if h.shape[0] == mask.numel():
        return h.reshape(*mask.shape, h.shape[-1])
    if h.shape[0] == int(mask.sum()):
        return h.new_zeros(*mask.shape, h.shape[-1]).masked_scatter(mask.unsqueeze(-1), h)
    raise NotImplementedError("fusedpref's TRL loss path needs the head's rows to match the labels (prompt-learning "
                              "PEFT adapters that prepend virtual tokens are not supported)")


def _in_forward(model, model_kwargs, labels, compute):
    """compute(hidden [2B, T-1, D], head call) run inside one forward of a model patched by TRL's
    add_fused_lm_head (its backbone and head as TRL calls them; HeadCapture); its result."""
    with _capturing(labels, compute) as capture:
        model(**model_kwargs, labels=labels, fused_lm_head=True)     # its output is discarded
    if capture.call is None:
        raise RuntimeError("fusedpref's TRL loss path expected one call of TRL's fused LM head in the model's "
                           "forward, saw none")
    return capture.result


def _expo_checks(trainer):
    """What DPOTrainer + EXPO cannot serve, raised when the trainer is built (before TRL
    precomputes anything)."""
    if trainer.precompute_ref_logps:
        raise ValueError("loss_type 'expo' with precompute_ref_log_probs=True: EXPO's exact KL(pi_ref || pi_theta) "
                         "runs over the vocabulary from the reference's hidden states, which precomputing drops. The "
                         "precomputed log-probs of the dataset's responses estimate no divergence (the responses are "
                         "not samples of pi_ref: log pi_ref(y) - log pi_theta(y) can be negative and does not vanish "
                         "in gradient at pi_theta = pi_ref). Set precompute_ref_log_probs=False (the reference model, "
                         "or the LoRA base with adapters disabled, then runs each step under no_grad)")


# TRL's loss types that read label_smoothing (its sigmoid does not, fusedpref's does: cDPO)
_TRL_SMOOTHED = {"exo_pair", "robust", "aot", "aot_unpaired"}
# TRL's loss types that divide by the unshifted completion_mask's counts (fusedpref: the scored targets')
_TRL_UNSHIFTED_LENGTHS = {"ipo", "sigmoid_norm"}


def _reference(trainer, model_kwargs, labels, vocab_kl: bool, ld_alpha=None) -> dict:
    """The reference's arguments of preference_loss / kto_loss, from one no-grad forward of the
    reference model (or of the PEFT policy with its adapters disabled, as TRL does), computed inside
    that forward (HeadCapture), where its head's weight is materialised: the sequence log-probs
    ref_logps (ld_alpha: LD-DPO's weighting, as preference_loss weighs the policy's), or for EXPO's
    exact KL the head itself: its hidden states and a copy of its weight and bias (under ZeRO-3 and
    FSDP the parameters are partitioned again once the forward returns; one V x D copy per step)."""
    from accelerate.utils import is_peft_model
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter

    from ..api import _ld_weights
    from ..functions import linear_logprobs

    targets = labels[:, 1:]

    def compute(hidden, call):
        cap, scale = _transform(call["logit_scale"], call["softcap"], call["temperature"])
        if vocab_kl:
            return dict(ref_hidden=hidden.detach(), ref_weight=call["weight"].detach().clone(),
                        ref_bias=None if call["bias"] is None else call["bias"].detach().clone(), ref_softcap=cap,
                        ref_logit_scale=scale)
        tok = linear_logprobs(hidden, call["weight"], targets, bias=call["bias"], softcap=cap, logit_scale=scale)
        if ld_alpha is not None:
            tok = tok * _ld_weights(targets != -100, targets.shape[0] // 2, ld_alpha).to(tok.dtype)
        return dict(ref_logps=tok.sum(-1))

    with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs):
        if is_peft_model(trainer.model) and trainer.ref_model is None:
            unwrapped = trainer.accelerator.unwrap_model(trainer.model)
            with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                return _in_forward(trainer.model, model_kwargs, labels, compute)
        return _in_forward(trainer.ref_model, model_kwargs, labels, compute)


def _fallback_reason(trainer, model, return_outputs) -> str | None:
    """Why DPOTrainer's loss cannot go through fusedpref.preference_loss here (None: it can); the
    call then runs TRL's own loss code on fusedpref's per-token head."""
    from accelerate.utils import is_peft_model

    from ..losses import LOSSES

    types = list(trainer.loss_types)
    unknown = [t for t in types if t not in LOSSES]
    if unknown:
        return f"loss_type {unknown} is not one of fusedpref's"
    if trainer.f_divergence_type != "reverse_kl" and not (
            trainer.f_divergence_type == "alpha_divergence" and abs(trainer.f_alpha_divergence_coef - 1.0) < 1e-6):
        return f"f_divergence_type={trainer.f_divergence_type!r}"
    if trainer.aux_loss_enabled:
        return "aux_loss_enabled=True (the MoE router loss comes from the model's outputs)"
    if return_outputs:
        return "return_outputs=True (logits for compute_metrics)"
    if trainer.label_smoothing and "sigmoid" in types:
        return "label_smoothing with loss_type 'sigmoid' (TRL's sigmoid ignores it; fusedpref's is cDPO)"
    if trainer.use_weighting and "sft" in types:
        return "use_weighting with loss_type 'sft'"
    if is_peft_model(model) and getattr(trainer.accelerator.unwrap_model(model).active_peft_config,
                                        "is_prompt_learning", False):
        return "a prompt-learning PEFT adapter (virtual tokens before the labels)"
    return None


def _preference_compute_loss(self, model, inputs, return_outputs, trl_compute_loss):
    """DPOTrainer._compute_loss through fusedpref.preference_loss: its loss (gradients in forward
    where the loss type decomposes over pairs, README "Gradients in forward"), TRL's logged metrics
    reduced across ranks as TRL reduces them. EXPO only runs here; the other loss types fall back to
    TRL's own loss code (on fusedpref's per-token head) where _fallback_reason says so."""
    expo = "expo" in self.loss_types or "typo" in self.loss_types
    reason = _fallback_reason(self, model, return_outputs)
    if reason is None and not expo and set(self.loss_types) & _TRL_UNSHIFTED_LENGTHS and \
            bool(inputs["completion_mask"][:, 0].any()):
        reason = "a completion starting at position 0 (TRL's ipo/sigmoid_norm count the unshifted mask)"
    if reason is not None:
        if expo:
            raise NotImplementedError(f"loss_type 'expo' through fusedpref does not support {reason}")
        logger.debug("DPOTrainer loss through TRL's own loss code: %s", reason)
        return trl_compute_loss(self, model, inputs, return_outputs)
    if expo:
        _expo_checks(self)
    mode = "train" if self.model.training else "eval"
    completion_mask = inputs["completion_mask"]
    model_kwargs = {k: v for k, v in inputs.items()
                    if k not in {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}}
    model_kwargs["use_cache"] = False
    labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
    targets = labels[:, 1:]

    if self.precompute_ref_logps:     # (not EXPO: _expo_checks)
        ref = dict(ref_logps=torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]))
    else:
        # EXPO's exact KL needs the reference head in the policy's pass; the others its log-probs
        ref = _reference(self, model_kwargs, labels, expo, self.ld_alpha)
    extra = {}
    if self.label_smoothing and (expo or set(self.loss_types) & _TRL_SMOOTHED):
        extra["label_smoothing"] = self.label_smoothing
    if "discopop" in self.loss_types:
        extra["discopop_tau"] = self.args.discopop_tau
    if self.ld_alpha is not None:
        extra["ld_alpha"] = self.ld_alpha

    def loss_fn(hidden, call):
        # TRL's softcap(s (h W^T + b)) / T as fusedpref's cap and scale, for each model's head
        cap, scale = _transform(call["logit_scale"], call["softcap"], call["temperature"])
        return preference_loss(hidden, call["weight"], targets, loss_type=list(self.loss_types),
                               loss_weights=list(self.loss_weights), beta=self.beta, bias=call["bias"], softcap=cap,
                               logit_scale=scale, use_weighting=bool(self.use_weighting), **ref, **extra)

    loss, metrics = _policy_loss(self, model, model_kwargs, labels, loss_fn)
    _log_metrics(self, mode, metrics.sequences, inputs)
    return loss


def _policy_loss(trainer, model, model_kwargs, labels, loss_fn):
    """loss_fn(hidden, head call) inside the policy's forward, where TRL calls its fused head (the
    head's weight is materialised there: gathered under ZeRO-3 by TRL's maybe_gather_lm_head_ctx,
    unsharded under FSDP), and that forward run inside the wrapped model's (TRL's
    _ForwardRedirection, as its distillation trainer runs its fused loss), so that the loss is the
    wrapper's output: DeepSpeed and FSDP arm their backward hooks on it (re-gathering for a
    recompute backward, reducing the gradients), and DDP's forward prepares its backward. Metrics
    are reduced after it returns (no collective inside a wrapped forward)."""
    from trl.models.utils import _ForwardRedirection

    unwrapped = trainer.accelerator.unwrap_model(model)
    return _ForwardRedirection()(model, unwrapped, lambda: _in_forward(unwrapped, model_kwargs, labels, loss_fn))


def _log_metrics(trainer, mode, seqs, inputs):
    """DPOTrainer's metrics from the per-sequence values, reduced over ranks as TRL reduces its own:
    token means as gathered sums over gathered counts, per-sequence means over the gathered
    sequences; EXPO adds kl/chosen and kl/rejected."""
    from ..losses import LOSSES

    gather_m, gather = trainer.accelerator.gather_for_metrics, trainer.accelerator.gather
    metrics = trainer._metrics[mode]
    b = seqs.logps.shape[0] // 2
    mask = seqs.mask.to(seqs.stats.dtype)
    mc, mr = mask[:b], mask[b:]

    def token_mean(total, count):
        total, count = gather_m(total.reshape(1)).sum(), gather_m(count.reshape(1)).sum()
        return (total / count).item() if count > 0 else 0.0

    metrics["entropy"].append(token_mean((seqs.stats[..., 1] * mask).sum(), mask.sum()))
    if mode == "train":
        tokens = gather_m(inputs["attention_mask"].sum().reshape(1)).sum().item()
        trainer._total_train_tokens += tokens // trainer._tp_size
    metrics["num_tokens"] = [trainer._total_train_tokens]
    metrics["logits/chosen"].append(token_mean((seqs.stats[:b, :, 0] / seqs.vocab * mc).sum(), mc.sum()))
    metrics["logits/rejected"].append(token_mean((seqs.stats[b:, :, 0] / seqs.vocab * mr).sum(), mr.sum()))
    metrics["mean_token_accuracy"].append(token_mean((seqs.stats[:b, :, 2] * mc).sum(), mc.sum()))
    beta = trainer.beta
    if LOSSES[trainer.loss_types[0]].rewards == "ratio" and seqs.ref_logps is not None:
        rewards = beta * (seqs.logps - seqs.ref_logps.to(seqs.logps.dtype))
    else:        # EXPO: the policy's own log-probs (its Bradley-Terry term's)
        rewards = beta * seqs.logps
    rc, rr = gather(rewards[:b]), gather(rewards[b:])
    metrics["rewards/chosen"].append(rc.mean().item())
    metrics["rewards/rejected"].append(rr.mean().item())
    metrics["rewards/accuracies"].append((rc > rr).float().mean().item())
    metrics["rewards/margins"].append((rc - rr).mean().item())
    metrics["logps/chosen"].append(gather(seqs.logps[:b]).mean().item())
    metrics["logps/rejected"].append(gather(seqs.logps[b:]).mean().item())
    if seqs.kl is not None:
        metrics["kl/chosen"].append(gather(seqs.kl[:b]).mean().item())
        metrics["kl/rejected"].append(gather(seqs.kl[b:]).mean().item())


# the batch entries of KTOTrainer that are not model inputs (as TRL's _compute_loss filters them)
_KTO_NON_MODEL_KEYS = {"completion_mask", "KL_input_ids", "KL_attention_mask", "KL_completion_mask", "KL_token_type_ids",
                       "KL_mm_token_type_ids", "label", "ref_logps", "ref_KL_logps"}


def _kto_compute_loss(self, model, inputs, return_outputs, trl_compute_loss):
    """KTOTrainer._compute_loss through fusedpref.kto_loss (gradients in forward by default), with
    TRL's metrics reduced across ranks as TRL reduces them. TRL's reference-KL estimate z0 (the
    rank-mean of each rank's mean KL_logps - ref_KL_logps, clamped at 0) is computed as TRL does,
    from forward-only calls of fusedpref's per-token head."""
    from accelerate.utils import is_peft_model
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter

    reason = ("loss_type " + repr(self.loss_type) if self.loss_type != "kto" else
              "aux_loss_enabled=True" if self.aux_loss_enabled else
              "return_outputs=True" if return_outputs else
              "a prompt-learning PEFT adapter" if is_peft_model(model) and getattr(
                  self.accelerator.unwrap_model(model).active_peft_config, "is_prompt_learning", False) else None)
    if reason is not None:
        logger.debug("KTOTrainer loss through TRL's own loss code: %s", reason)
        return trl_compute_loss(self, model, inputs, return_outputs)
    mode = "train" if self.model.training else "eval"
    batch = {k: (v.to(self.accelerator.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    desirable = torch.as_tensor(batch["label"], dtype=torch.bool, device=self.accelerator.device)
    model_kwargs = {k: v for k, v in batch.items() if k not in _KTO_NON_MODEL_KEYS}
    model_kwargs["use_cache"] = False
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    targets = labels[:, 1:]
    kl_logps = self._compute_kl_logps(model, batch)       # (None without calculate_KL)
    if self.precompute_ref_logps:
        ref = dict(ref_logps=batch["ref_logps"])
        ref_kl_logps = batch["ref_KL_logps"] if self.calculate_KL else None
    else:
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if is_peft_model(self.model) and self.ref_model is None:
                unwrapped = self.accelerator.unwrap_model(self.model)
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    ref_kl_logps = self._compute_kl_logps(self.model, batch)
            else:
                ref_kl_logps = self._compute_kl_logps(self.ref_model, batch)
        ref = _reference(self, model_kwargs, labels, False)
    if self.calculate_KL:       # TRL's z0, passed as one precomputed value (kto_loss clamps it at 0)
        z0 = self.accelerator.gather_for_metrics((kl_logps - ref_kl_logps).mean().detach()).mean()
        ref.update(kl_logps=z0.reshape(1), ref_kl_logps=torch.zeros_like(z0).reshape(1))

    def loss_fn(hidden, call):
        cap, scale = _transform(call["logit_scale"], call["softcap"], call["temperature"])
        return kto_loss(hidden, call["weight"], targets, desirable, beta=self.beta, bias=call["bias"],
                        desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight,
                        softcap=cap, logit_scale=scale, **ref)

    loss, metrics = _policy_loss(self, model, model_kwargs, labels, loss_fn)
    _log_kto_metrics(self, mode, metrics, desirable, batch)
    return loss


def _log_kto_metrics(trainer, mode, metrics, desirable, batch):
    """KTOTrainer's metrics, reduced over ranks as TRL reduces its own (sums over gathered counts)."""
    seqs = metrics.sequences
    gather_m = trainer.accelerator.gather_for_metrics
    logged = trainer._metrics[mode]

    def total(x):
        return gather_m(x.reshape(1)).sum().item()

    logged["kl"].append(metrics["kl"].item())
    mask = seqs.mask.to(seqs.stats.dtype)
    tokens = total(mask.sum())
    logged["entropy"].append(total((seqs.stats[..., 1] * mask).sum()) / tokens if tokens > 0 else 0.0)
    if mode == "train":
        trainer._total_train_tokens += total(batch["attention_mask"].sum()) // trainer._tp_size
    logged["num_tokens"] = [trainer._total_train_tokens]
    d = desirable.to(mask.dtype)
    per_logit = seqs.stats[..., 0] / seqs.vocab
    for kind, rows in (("chosen", d), ("rejected", 1 - d)):
        n_tok = total((mask * rows[:, None]).sum())
        if n_tok > 0:
            logged[f"logits/{kind}"].append(total((per_logit * mask * rows[:, None]).sum()) / n_tok)
    rewards = trainer.beta * (seqs.logps - seqs.ref_logps)
    counts = {kind: total(rows.sum()) for kind, rows in (("chosen", d), ("rejected", 1 - d))}
    for kind, rows in (("chosen", d), ("rejected", 1 - d)):
        if counts[kind] > 0:
            logged[f"rewards/{kind}"].append(total((rewards * rows).sum()) / counts[kind])
            logged[f"logps/{kind}"].append(total((seqs.logps * rows).sum()) / counts[kind])
    if counts["chosen"] > 0 and counts["rejected"] > 0:
        logged["rewards/margins"].append(logged["rewards/chosen"][-1] - logged["rewards/rejected"][-1])


def _wrap_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if "expo" in self.loss_types or "typo" in self.loss_types:
            _expo_checks(self)
    __init__._fusedpref = True
    return __init__


def _lm_head_adapter(model):
    """The name of a PEFT tuner layer (LoRA, ...) wrapping the model's LM head, or None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:           # no PEFT: no adapter
        return None
    if isinstance(head, BaseTunerLayer):
        return type(head).__name__
    return None


def _guard_lm_head(add_fused_lm_head):
    """TRL's add_fused_lm_head, whose fused forward refuses a PEFT adapter on the LM head (the fused
    head reads lm_head.weight: the frozen base weight, without the adapter's term)."""
    @functools.wraps(add_fused_lm_head)
    def add(model, *args, **kwargs):
        add_fused_lm_head(model, *args, **kwargs)
        fused = model.forward

        @functools.wraps(fused)
        def forward(*a, **k):
            if k.get("fused_lm_head"):
                kind = _lm_head_adapter(model)
                if kind is not None:
                    raise ValueError(f"fusedpref's fused LM head cannot serve a PEFT adapter on the LM head (lm_head is "
                                     f"a {kind}: 'lm_head' is in the adapter's target_modules). The fused head reads "
                                     "lm_head.weight, the frozen base weight, so the adapter's low-rank term would be "
                                     "silently missing. Remove 'lm_head' from target_modules (modules_to_save="
                                     "['lm_head'] trains a full copy, which the fused head reads correctly), or run "
                                     "TRL's own head (fusedpref.integrations.trl.unpatch_trl())")
            return fused(*a, **k)
        model.forward = forward
    add._fusedpref = True
    return add


def _routed(impl):
    """The patch of a trainer's _compute_loss: impl(self, model, inputs, return_outputs, TRL's own
    _compute_loss), which computes the loss through fusedpref or falls back to TRL's."""
    def wrap(original):
        @functools.wraps(original)
        def _compute_loss(self, model, inputs, return_outputs):
            return impl(self, model, inputs, return_outputs, original)
        _compute_loss._fusedpref = True
        return _compute_loss
    return wrap


def step_clock():
    """(a transformers TrainerCallback, the list it appends each optimizer step's seconds to)."""
    import time

    import transformers

    times = []

    class StepClock(transformers.TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.t0)
    return StepClock(), times


def dpo_loss_types() -> list[str]:
    """The loss types TRL's DPOTrainer accepts, read from its loss dispatch."""
    from trl import DPOTrainer

    source = inspect.getsource(_original_attr(DPOTrainer, "_compute_loss"))
    return sorted(set(re.findall(r'loss_type == "(\w+)"', source)))


# ---------------------------------------------------------------- patching

def _targets():
    """(object, attribute, replacement) of every patch."""
    try:
        import trl.kernels as kernels
        import trl.kernels.chunked_divergence as divergence
        import trl.kernels.chunked_logprob as logprob
        import trl.trainer.distillation_trainer as distillation
        import trl.trainer.utils as utils
        from trl import DPOTrainer, KTOTrainer
        trainer_modules = [importlib.import_module(f"trl.trainer.{m}_trainer")
                           for m in ("dpo", "kto", "sft", "rloo", "grpo")]
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("fusedpref.integrations.trl needs trl >= 1.16 (pip install 'fusedpref[trl]')") from exc
    if not hasattr(utils, "_ChunkedLogProbFunction") or not hasattr(distillation, "ChunkedDivergenceFunction"):
        raise ImportError("this TRL has no fused LM head (trl.trainer.utils._ChunkedLogProbFunction) or "
                          "chunked divergence; fusedpref.integrations.trl needs trl >= 1.16")
    guarded = [(m, "add_fused_lm_head", _guard_lm_head) for m in [utils, *trainer_modules]
               if hasattr(m, "add_fused_lm_head")]
    return [(utils, "_ChunkedLogProbFunction", FusedLogProbHead), (kernels, "ChunkedLogProbFunction", FusedLogProbHead),
            (logprob, "ChunkedLogProbFunction", FusedLogProbHead),
            (divergence, "ChunkedDivergenceFunction", FusedDivergence),
            (distillation, "ChunkedDivergenceFunction", FusedDivergence),
            (DPOTrainer, "_compute_loss", _routed(_preference_compute_loss)), (DPOTrainer, "__init__", _wrap_init),
            (KTOTrainer, "_compute_loss", _routed(_kto_compute_loss)), *guarded]


def _original_attr(obj, name):
    for o, n, original in _PATCHES:
        if o is obj and n == name:
            return original
    return getattr(obj, name)


def patch_trl() -> None:
    """Route TRL's fused heads through fusedpref and teach DPOTrainer loss_type "expo". Idempotent."""
    if _PATCHES:
        return
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    for obj, name, replacement in _targets():
        original = obj.__dict__[name] if isinstance(obj, type) else getattr(obj, name)
        if inspect.isfunction(replacement):      # a wrapper of the original (the drop-in classes replace it)
            replacement = replacement(original)
        _PATCHES.append((obj, name, original))
        setattr(obj, name, replacement)
    functions.set_weight_gather(maybe_gather_lm_head_ctx)


def unpatch_trl() -> None:
    """Restore TRL's own heads and loss dispatch."""
    while _PATCHES:
        obj, name, original = _PATCHES.pop()
        setattr(obj, name, original)
    functions.set_weight_gather(None)


def is_patched() -> bool:
    return bool(_PATCHES)
