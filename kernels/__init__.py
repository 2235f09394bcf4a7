"""@triton.jit kernels of fusedpref (installed as ``fusedpref.kernels``).

Only Triton code lives here: no torch, no autograd. Host wrappers are in ``fusedpref.ops``.
"""
from .frozen import chunk_kl_probs_kernel, chunk_logits_kernel, chunk_probs_kernel, kept_dz_kernel
from .kl import jsd_fwd_kernel, kl_dz_kernel, kl_fwd_kernel
from .logprobs import logprob_dz_kernel, logprob_fwd_kernel
from .matmul import mm_acc_kernel

__all__ = ["logprob_fwd_kernel", "logprob_dz_kernel", "mm_acc_kernel", "kl_fwd_kernel", "kl_dz_kernel",
           "jsd_fwd_kernel", "chunk_logits_kernel", "chunk_probs_kernel",
           "chunk_kl_probs_kernel", "kept_dz_kernel"]
