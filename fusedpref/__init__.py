"""fusedpref: fused LM-head + log-softmax + preference-loss kernels (Triton) for preference
fine-tuning, with a chunked pure-PyTorch backend of the same contract."""
from .api import FusedLinearPreferenceLoss, kto_loss, preference_loss, reference_logps
from .functions import (LinearDivergence, LinearKL, LinearLogProbs, LinearLogProbsKL, linear_divergence, linear_kl,
                        linear_logprobs, linear_logprobs_kl)
from .losses import LOSSES

__version__ = "0.1.0"
__all__ = ["LinearLogProbs", "linear_logprobs", "LinearKL", "linear_kl", "LinearLogProbsKL", "linear_logprobs_kl",
           "LinearDivergence", "linear_divergence", "preference_loss", "FusedLinearPreferenceLoss", "reference_logps", "kto_loss", "LOSSES"]
