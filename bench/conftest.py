"""pytest-benchmark suite (run: pytest bench/ --benchmark-only). Without CUDA the torch backend
is timed (the Triton interpreter is not a speed measurement)."""
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKEND = "triton" if DEVICE == "cuda" else "torch"
