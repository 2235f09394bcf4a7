"""fusedpref under TRL's own fused LM head.

TRL (>= 1.16) patches a causal LM with `trl.trainer.utils.add_fused_lm_head`; its forward with
`fused_lm_head=True` calls `trl.trainer.utils._ChunkedLogProbFunction.apply(hidden [N, H],
weight [V, H], bias, targets [N], temperature, chunk_size, final_logit_softcapping,
logit_scale, outputs)` and reads back `(log_probs, entropy, log_sum_sq_probs, mean_logits,
is_top1)`. `patch_trl()` swaps that one name for `FusedLogProbHead`, which computes the same
fields with fusedpref's kernels (`LinearLogProbs` with its online statistics), so DPOTrainer,
KTOTrainer, SFTTrainer and the others run on fusedpref unchanged:

    import fusedpref.integrations.trl as fp_trl
    fp_trl.patch_trl()          # before or after the trainer is built; unpatch_trl() undoes it

What fusedpref does not compute is handed to TRL's own function, unchanged: the
`log_sum_sq_probs` output (WPO weights), and a temperature other than 1 together with a logit
soft-cap (fusedpref applies the cap last). The entropy output is a statistic here, not a
differentiable function: a gradient reaching it raises instead of being dropped.
"""
from __future__ import annotations

import torch

from ..functions import LinearLogProbs

_ORIGINAL = None


class _NoGradient(torch.autograd.Function):
    """Identity on a statistic that fusedpref does not differentiate; backward raises."""

    @staticmethod
    def forward(ctx, value, anchor):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("fusedpref's TRL head returns the entropy as a statistic without a gradient; "
                           "a loss that differentiates the entropy needs TRL's own head "
                           "(fusedpref.integrations.trl.unpatch_trl())")


class FusedLogProbHead:
    """Drop-in for `trl.kernels.ChunkedLogProbFunction` (same `apply` signature and outputs)."""

    @staticmethod
    def supports(temperature, final_logit_softcapping, outputs) -> bool:
        return "log_sum_sq_probs" not in outputs and (final_logit_softcapping is None or temperature == 1.0)

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        if not FusedLogProbHead.supports(temperature, final_logit_softcapping, outputs):
            return _original().apply(hidden, weight, bias, targets, temperature, chunk_size,
                                     final_logit_softcapping, logit_scale, outputs)
        # TRL's logits: softcap((hidden @ weight.T + bias) * logit_scale) / temperature. Without a
        # cap that is a linear head scaled by logit_scale / temperature (with one, temperature is 1)
        scale = logit_scale / temperature if final_logit_softcapping is None else logit_scale
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        with torch.autocast(device_type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)          # fusedpref's kernels take one dtype
            b = None if bias is None else bias.to(dtype)
            if scale != 1.0:
                h = h * scale
                b = None if b is None else b * scale
            want_stats = any(k in outputs for k in ("entropy", "mean_logits", "is_top1"))
            logp, stats = LinearLogProbs.apply(h, w, targets, b, -100, final_logit_softcapping, "auto",
                                               want_stats)
        entropy = mean_logits = is_top1 = None
        if "entropy" in outputs:
            entropy = _NoGradient.apply(stats[:, 1], logp) if logp.requires_grad else stats[:, 1]
        if "mean_logits" in outputs:
            mean_logits = stats[:, 0] / weight.shape[0]
        if "is_top1" in outputs:
            is_top1 = stats[:, 2] > 0.5
        return logp, entropy, None, mean_logits, is_top1


def _utils():
    try:
        import trl.trainer.utils as utils
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("fusedpref.integrations.trl needs trl >= 1.16 (trl.trainer.utils) installed") from exc
    if not hasattr(utils, "_ChunkedLogProbFunction"):
        raise ImportError("this TRL has no trl.trainer.utils._ChunkedLogProbFunction (fused LM head); "
                          "fusedpref.integrations.trl needs trl >= 1.16")
    return utils


def _original():
    return _ORIGINAL if _ORIGINAL is not None else _utils()._ChunkedLogProbFunction


def patch_trl() -> None:
    """Route TRL's fused LM head (`add_fused_lm_head`) through fusedpref. Idempotent."""
    global _ORIGINAL
    utils = _utils()
    if utils._ChunkedLogProbFunction is not FusedLogProbHead:
        _ORIGINAL = utils._ChunkedLogProbFunction
        utils._ChunkedLogProbFunction = FusedLogProbHead


def unpatch_trl() -> None:
    """Restore TRL's own fused LM head."""
    global _ORIGINAL
    utils = _utils()
    if utils._ChunkedLogProbFunction is FusedLogProbHead:
        utils._ChunkedLogProbFunction = _ORIGINAL
    _ORIGINAL = None
