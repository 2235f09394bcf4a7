"""`fusedpref bench`: fused preference loss forward+backward against the alternatives.

Modules: providers (inputs, loss callables, errors against the oracle), measure (timing, memory,
worker processes), report (table, CSV, plot), cli (the command).

Providers (each computes the same policy loss on the same inputs; the reference log-probs are
precomputed, as TRL's precompute_ref_log_probs does):
  eager         full logits in the input dtype, log_softmax in fp32, gather (TRL's way)
  compile       torch.compile of the eager loss (on the CPU only when asked for)
  fused-torch   fusedpref, chunked PyTorch backend
  fused-triton  fusedpref, Triton kernels (GPU only)
  trl           TRL's own chunked LM head (trl.kernels.ChunkedLogProbFunction, what DPOTrainer
                patches into the model since TRL 1.16), called as DPOTrainer does: valid rows only,
                with the entropy / mean-logit / top-1 outputs its metrics use (when importable)
  liger         Liger-Kernel's LigerFusedLinearDPOLoss (sigmoid loss only, no reference input;
                when importable; torch.compile'd chunks on GPU as Liger defaults, eager on CPU)
  cce           Cut Cross-Entropy linear_cross_entropy(reduction="none") summed per sequence
                (when importable, GPU)

Each provider runs in its own worker process (a crash, OOM or --timeout stops that provider
alone). On CUDA: triton.testing.do_bench and torch.cuda.max_memory_allocated. On the CPU: median
wall time of a few repeats, and the raise of peak RSS, whose mark is reset before each
measurement (MALLOC_MMAP_THRESHOLD_ set so freed blocks return to the OS). peak_mb is the peak memory above
inputs and weights during forward+backward; extra_mb subtracts the gradients (which every
provider must produce). On the CPU extra_mb is within allocator noise of 0 for small fused runs.
"""
from .cli import main, run  # noqa: F401
from .measure import matmul_tflops, measure, run_provider  # noqa: F401
from .providers import (ALL_PROVIDERS, CPU_DEFAULT_PROVIDERS, available, errors, flop_count, is_expo,  # noqa: F401
                        loss_fn, make_inputs, provider_ref)
from .report import CSV_COLS, TABLE_COLS, plot, print_table  # noqa: F401
