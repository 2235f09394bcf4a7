"""Every tunable knob of fusedpref in one place.

One fixed, known-good tile configuration per (GPU architecture, dtype) and kernel. Autotuning
is opt-in: set FUSEDPREF_AUTOTUNE=1 and the first call per (kernel, dtype, shape bucket) times
the candidates below with triton.testing.do_bench and keeps the fastest for the process.

FUSEDPREF_CHUNK_MB bounds the vocabulary-chunk buffers that backward (and the torch backend's
forward) allocate: rows x chunk_columns x element size <= this many MiB per buffer. Default for
the Triton backend: 8192 columns capped at 256 MiB (fusedpref/schedule.py: fewer chunks mean
fewer fp32 dH read-modify-writes and H re-reads); setting the variable replaces both. Default
for the torch backend: 8 MiB for all the chunk buffers a pass holds at once (fusedpref/chunked.py
sizes each pass's chunk for them; 256 MiB on CUDA).

FUSEDPREF_CHUNK_COLS=n overrides that with exactly n vocabulary columns per chunk (any n >= 1;
tests use it to make V span several chunks with boundaries inside a tile).

`empty` allocates every buffer a kernel must write completely; the tests replace it by a
NaN-filling allocator (tests/helpers.py poison), so an element left unwritten shows as NaN.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tiles:
    BLOCK_N: int
    BLOCK_V: int
    BLOCK_D: int
    num_warps: int
    num_stages: int

    def constexprs(self) -> dict:
        return {"BLOCK_N": self.BLOCK_N, "BLOCK_V": self.BLOCK_V, "BLOCK_D": self.BLOCK_D}

    def launch(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


# One config per (kernel, arch major, dtype), as it runs: chosen so that every kernel compiles for
# sm_80 and sm_90 with zero register spills and at most 240 registers, in the general binary and in
# the main shape's specialisation (fusedpref/_aot.py; tests/test_aot.py checks it under Triton 3.9
# and 3.6, 2026-12-01), and uses wgmma on sm_90. Kernels: fwd / fwd_stats the log-prob forward
# without / with the metric statistics; dz / dz_stats its backward without / with the statistics'
# gradient (an entropy bonus); mm dH += dz @ W (BLOCK_N the row tile, BLOCK_V the hidden tile,
# BLOCK_D the K slice); logits / probs the frozen path's chunk logits and elementwise pass
# (kernels/frozen.py); kl_fwd / kl_fwd_stats / kl_dz the two-head kernels (two logit tiles live:
# half the rows). fp32 runs three TF32 passes per dot ("tf32x3"), which costs registers: smaller
# tiles. A comment names what the obvious larger config did instead.
_BF, _FP, _F32 = torch.bfloat16, torch.float16, torch.float32
TILES = {
    # kernel          arch dtype   BLOCK_N BLOCK_V BLOCK_D warps stages
    ("fwd", 9, _BF): Tiles(128, 64, 64, 8, 3),          # 128x128x32: 242 regs under 3.6
    ("fwd", 9, _FP): Tiles(128, 64, 64, 8, 3),
    ("fwd", 9, _F32): Tiles(64, 64, 32, 8, 3),          # 64x128x16: 252 regs under 3.6
    ("fwd", 8, _BF): Tiles(128, 64, 64, 8, 3),
    ("fwd", 8, _FP): Tiles(128, 64, 64, 8, 3),
    ("fwd", 8, _F32): Tiles(64, 64, 16, 8, 3),
    ("fwd_stats", 9, _BF): Tiles(128, 64, 64, 8, 3),    # 128x128: spills 8 B under 3.9
    ("fwd_stats", 9, _FP): Tiles(128, 64, 64, 8, 3),
    ("fwd_stats", 9, _F32): Tiles(64, 64, 32, 8, 3),
    ("fwd_stats", 8, _BF): Tiles(64, 128, 32, 8, 3),    # 128x64x64: 245 regs
    ("fwd_stats", 8, _FP): Tiles(64, 128, 32, 8, 3),
    ("fwd_stats", 8, _F32): Tiles(64, 64, 16, 8, 3),
    ("dz", 9, _BF): Tiles(128, 128, 64, 8, 3),
    ("dz", 9, _FP): Tiles(128, 128, 64, 8, 3),
    ("dz", 9, _F32): Tiles(64, 128, 32, 8, 3),
    ("dz", 8, _BF): Tiles(64, 128, 32, 8, 3),           # 128x128x32: 245 regs under 3.6
    ("dz", 8, _FP): Tiles(64, 128, 32, 8, 3),
    ("dz", 8, _F32): Tiles(64, 64, 32, 4, 3),
    ("dz_stats", 9, _BF): Tiles(128, 64, 64, 8, 3),     # 128x128x64: 255 regs, spills 8 B
    ("dz_stats", 9, _FP): Tiles(128, 64, 64, 8, 3),
    ("dz_stats", 9, _F32): Tiles(64, 128, 32, 8, 3),
    ("dz_stats", 8, _BF): Tiles(64, 128, 32, 8, 3),
    ("dz_stats", 8, _FP): Tiles(64, 128, 32, 8, 3),
    ("dz_stats", 8, _F32): Tiles(64, 64, 32, 4, 3),
    ("mm", 9, _BF): Tiles(128, 128, 64, 8, 3),
    ("mm", 9, _FP): Tiles(128, 128, 64, 8, 3),
    ("mm", 9, _F32): Tiles(64, 128, 32, 8, 3),
    ("mm", 8, _BF): Tiles(128, 128, 32, 8, 3),
    ("mm", 8, _FP): Tiles(128, 128, 32, 8, 3),
    ("mm", 8, _F32): Tiles(64, 64, 32, 4, 3),
    ("logits", 9, _BF): Tiles(128, 128, 64, 8, 3),
    ("logits", 9, _FP): Tiles(128, 128, 64, 8, 3),
    ("logits", 9, _F32): Tiles(64, 128, 32, 8, 3),
    ("logits", 8, _BF): Tiles(128, 64, 32, 8, 3),       # 64x128x32: 8 B stack under 3.6 (specialised)
    ("logits", 8, _FP): Tiles(128, 64, 32, 8, 3),
    ("logits", 8, _F32): Tiles(64, 64, 32, 4, 3),
    ("probs", 9, _BF): Tiles(32, 128, 16, 8, 1),        # 4 warps: 255 regs (the KL pass)
    ("probs", 9, _FP): Tiles(32, 128, 16, 8, 1),
    ("probs", 9, _F32): Tiles(32, 128, 16, 8, 1),
    ("probs", 8, _BF): Tiles(32, 128, 16, 8, 1),
    ("probs", 8, _FP): Tiles(32, 128, 16, 8, 1),
    ("probs", 8, _F32): Tiles(32, 128, 16, 8, 1),
    ("kl_fwd", 9, _BF): Tiles(64, 64, 64, 8, 3),
    ("kl_fwd", 9, _FP): Tiles(64, 64, 64, 8, 3),
    ("kl_fwd", 9, _F32): Tiles(64, 64, 16, 8, 3),       # 64x64x32: 242 regs
    ("kl_fwd", 8, _BF): Tiles(64, 64, 32, 8, 3),
    ("kl_fwd", 8, _FP): Tiles(64, 64, 32, 8, 3),
    ("kl_fwd", 8, _F32): Tiles(32, 128, 16, 8, 3),      # 64x64x32: 255 regs, spills when specialised
    ("kl_fwd_stats", 9, _BF): Tiles(64, 64, 32, 8, 3),  # 64x64x64: 248 regs under 3.6
    ("kl_fwd_stats", 9, _FP): Tiles(64, 64, 32, 8, 3),
    ("kl_fwd_stats", 9, _F32): Tiles(64, 64, 16, 8, 3),     # 64x64x32: 248 regs
    ("kl_fwd_stats", 8, _BF): Tiles(64, 64, 32, 8, 2),  # 64x64x32 x3 stages: 244 regs
    ("kl_fwd_stats", 8, _FP): Tiles(64, 64, 32, 8, 2),
    ("kl_fwd_stats", 8, _F32): Tiles(32, 64, 16, 8, 3),     # 32x128x16: 241 regs
    ("kl_dz", 9, _BF): Tiles(64, 64, 64, 8, 3),         # 64x128x64: 254 regs under 3.6
    ("kl_dz", 9, _FP): Tiles(64, 64, 64, 8, 3),
    ("kl_dz", 9, _F32): Tiles(64, 64, 32, 8, 3),        # 64x128x32: 255 regs
    ("kl_dz", 8, _BF): Tiles(64, 128, 32, 8, 3),
    ("kl_dz", 8, _FP): Tiles(64, 128, 32, 8, 3),
    ("kl_dz", 8, _F32): Tiles(64, 64, 16, 4, 2),        # 3 stages: 242 regs under 3.6
}
# In the Triton interpreter (CPU tests) small tiles, so that tests at 37 tokens x hidden 72 x
# vocab 1009 cross several row blocks, K slices and vocabulary tiles.
_INTERPRETER_TILES = Tiles(16, 64, 32, 4, 1)

AUTOTUNE_CANDIDATES = [
    Tiles(128, 128, 64, 8, 3),
    Tiles(128, 256, 64, 8, 3),
    Tiles(64, 128, 64, 4, 4),
    Tiles(128, 128, 32, 8, 4),
    Tiles(64, 256, 32, 8, 3),
]



def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    return os.environ.get("FUSEDPREF_AUTOTUNE", "0") == "1"


def chunk_bytes(default_mb: float = 32) -> int:
    mb = float(os.environ.get("FUSEDPREF_CHUNK_MB", default_mb))
    if not mb > 0:
        raise ValueError(f"FUSEDPREF_CHUNK_MB must be a positive number of MiB, got {mb!r}")
    return int(mb * 2**20)


def kept_bytes(kept_mb=None, device=None) -> int:
    """The budget of the gradients-in-forward path's kept logits (rows x V buffers of one chunk of
    pairs): kept_mb, else FUSEDPREF_KEPT_MB, else FUSEDPREF_CHUNK_MB, else 1024 MiB on CUDA and 8 MiB
    on the CPU (the torch backend's chunk budget: its memory stays the recompute path's unless asked
    for more)."""
    if kept_mb is None and os.environ.get("FUSEDPREF_KEPT_MB"):
        kept_mb = float(os.environ["FUSEDPREF_KEPT_MB"])
    if kept_mb is not None:
        if isinstance(kept_mb, bool) or not isinstance(kept_mb, (int, float)) or not kept_mb > 0:
            raise ValueError(f"kept_mb must be a positive number of MiB, got {kept_mb!r}")
        return int(kept_mb * 2**20)
    if chunk_bytes_set():
        return chunk_bytes()
    return (1024 if device is not None and device.type == "cuda" else 8) * 2**20


def chunk_bytes_set() -> bool:
    return bool(os.environ.get("FUSEDPREF_CHUNK_MB"))


def l2_bytes(device: torch.device) -> int:
    """The L2 size the forward's split count is planned for (the interpreter: 8 MiB)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
    return 8 * 2**20


def chunk_cols() -> int | None:
    value = os.environ.get("FUSEDPREF_CHUNK_COLS")
    if value is None or value == "":
        return None
    try:
        cols = int(value)
    except ValueError:
        cols = 0
    if cols < 1:
        raise ValueError(f"FUSEDPREF_CHUNK_COLS must be a whole number of columns >= 1, got {value!r}")
    return cols


def empty(shape, dtype, device) -> torch.Tensor:
    """The allocator of kernel outputs that are written completely (torch.empty)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _arch(device: torch.device) -> int:
    if device.type != "cuda":
        return 9
    major = torch.cuda.get_device_capability(device)[0]
    return 9 if major >= 9 else 8


def tiles(kernel: str, device: torch.device, dtype: torch.dtype) -> Tiles:
    """The fixed config of `kernel` ("fwd", "fwd_stats", "dz", "dz_stats", "mm", "kl_fwd",
    "kl_fwd_stats", "kl_dz", "logits", "probs") for this device and dtype."""
    if interpreting():
        return _INTERPRETER_TILES
    return TILES[(kernel, _arch(device), dtype)]


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: enough splits to exercise the split-combine path


_TUNED: dict = {}


def autotuned(key, run) -> Tiles:
    """Time `run(tiles)` for each candidate once per key; return (and cache) the fastest."""
    if key not in _TUNED:
        import triton.testing

        timings = []
        for tiles in AUTOTUNE_CANDIDATES:
            try:
                timings.append((triton.testing.do_bench(lambda: run(tiles)), tiles))
            except Exception:  # a candidate that does not fit this GPU (shared memory)
                continue
        if not timings:
            raise RuntimeError(f"fusedpref autotune: no candidate config ran for {key}")
        _TUNED[key] = min(timings, key=lambda t: t[0])[1]
    return _TUNED[key]
