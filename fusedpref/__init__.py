"""fusedpref: fused LM-head + log-softmax + preference-loss kernels (Triton) for preference
fine-tuning, with a chunked pure-PyTorch backend of the same contract."""
from .functions import LinearLogProbs, linear_logprobs

__version__ = "0.1.0"
__all__ = ["LinearLogProbs", "linear_logprobs"]
