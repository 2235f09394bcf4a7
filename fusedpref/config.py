"""Every tunable knob of fusedpref in one place.

One fixed, known-good tile configuration per (GPU architecture, dtype) and kernel. Autotuning
is opt-in: set FUSEDPREF_AUTOTUNE=1 and the first call per (kernel, dtype, shape bucket) times
the candidates below with triton.testing.do_bench and keeps the fastest for the process.

FUSEDPREF_CHUNK_MB bounds the vocabulary-chunk buffers that backward (and the torch backend's
forward) allocate: rows x chunk_columns x element size <= this many MiB per buffer. Default for
the Triton backend: 8192 columns capped at 256 MiB (fusedpref/schedule.py: fewer chunks mean
fewer fp32 dH read-modify-writes and H re-reads); setting the variable replaces both. Default
for the torch backend: 8 MiB (it holds about two such fp32 buffers at once).

FUSEDPREF_CHUNK_COLS=n overrides that with exactly n vocabulary columns per chunk (any n >= 1;
tests use it to make V span several chunks with boundaries inside a tile).

FUSEDPREF_POISON=1 (tests) fills every buffer a kernel must write completely with NaN first,
so an element left unwritten shows up as NaN instead of stale memory.
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


# One config per (kernel, arch major, dtype): chosen so that every kernel compiles for sm_80 and
# sm_90 with zero register spills (tests/test_aot.py checks it) and uses wgmma on sm_90.
# "fwd_stats" is the forward with the metric statistics (more live registers).
# For "mm" (dH += dz @ W) BLOCK_N is the row tile, BLOCK_V the hidden tile, BLOCK_D the K slice.
# fp32 runs three TF32 passes per dot ("tf32x3"), which costs registers: smaller tiles.
_BF, _FP, _F32 = torch.bfloat16, torch.float16, torch.float32
TILES = {}
for _dt in (_BF, _FP):
    TILES.update({
        ("fwd", 9, _dt): Tiles(128, 64, 64, 8, 3),
        ("fwd_stats", 9, _dt): Tiles(128, 64, 64, 8, 3),
        ("dz", 9, _dt): Tiles(128, 128, 64, 8, 3),
        ("mm", 9, _dt): Tiles(128, 128, 64, 8, 3),
        ("fwd", 8, _dt): Tiles(128, 64, 64, 8, 3),
        ("fwd_stats", 8, _dt): Tiles(128, 64, 64, 8, 3),
        ("dz", 8, _dt): Tiles(128, 128, 32, 8, 3),
        ("mm", 8, _dt): Tiles(128, 128, 32, 8, 3),
    })
TILES.update({
    ("fwd", 9, _F32): Tiles(64, 128, 16, 8, 3),
    ("fwd_stats", 9, _F32): Tiles(64, 128, 16, 8, 3),
    ("dz", 9, _F32): Tiles(64, 128, 32, 8, 3),
    ("mm", 9, _F32): Tiles(64, 128, 32, 8, 3),
    ("fwd", 8, _F32): Tiles(64, 64, 16, 8, 3),
    ("fwd_stats", 8, _F32): Tiles(64, 64, 16, 8, 3),
    ("dz", 8, _F32): Tiles(64, 64, 32, 4, 3),
    ("mm", 8, _F32): Tiles(64, 64, 32, 4, 3),
})
# The KL kernels hold two logit tiles (policy and reference) at once: half the rows.
for _a in (8, 9):
    for _dt in (_BF, _FP, _F32):
        _bd = 32 if (_dt == _F32 or _a == 8) else 64
        TILES[("kl_fwd", _a, _dt)] = Tiles(64, 64, _bd, 8, 3)
        TILES[("kl_fwd_stats", _a, _dt)] = Tiles(64, 64, _bd, 8, 3)   # + targets and stats
        TILES[("kl_dz", _a, _dt)] = Tiles(64, 128, _bd, 8, 3)
TILES[("kl_dz", 8, _F32)] = Tiles(64, 64, 16, 4, 3)
# chosen from compile results of both checked binaries (fusedpref/_aot.py: general and the main
# shape's specialisation) for zero spills and <= 240 registers (2026-12-01, Triton 3.9 and 3.6)
TILES[("kl_fwd", 8, _F32)] = Tiles(32, 128, 16, 8, 3)           # 64x64x32: 255 regs, spills when specialised
TILES[("kl_fwd_stats", 8, _F32)] = Tiles(32, 64, 16, 8, 3)      # 32x128x16: 241 regs
TILES[("kl_fwd", 9, _F32)] = Tiles(64, 64, 16, 8, 3)            # 64x64x32: 242 regs
TILES[("kl_fwd_stats", 9, _F32)] = Tiles(64, 64, 16, 8, 3)      # 64x64x32: 248 regs
TILES[("kl_dz", 9, _F32)] = Tiles(64, 64, 32, 8, 3)             # 64x128x32: 255 regs
TILES[("fwd", 9, _F32)] = Tiles(64, 64, 32, 8, 3)               # 64x128x16: 252 regs under 3.6
TILES[("fwd_stats", 9, _F32)] = Tiles(64, 64, 32, 8, 3)
for _dt in (_BF, _FP):
    TILES[("fwd_stats", 8, _dt)] = Tiles(64, 128, 32, 8, 3)     # 128x64x64: 245 regs
    TILES[("dz", 8, _dt)] = Tiles(64, 128, 32, 8, 3)            # 128x128x32: 245 regs under 3.6
    TILES[("kl_dz", 9, _dt)] = Tiles(64, 64, 64, 8, 3)          # 64x128x64: 254 regs under 3.6
    # ("fwd", 9) stays 128x64x64: 128x128x32 is 201 regs under 3.9 but 242 under 3.6; fwd_stats
    # at 128x128 spills 8 B under 3.9
# The backward with the statistics' gradient (an entropy bonus: STATS_GRAD) keeps two more tiles
# live than the plain dz: the plain dz's config except where that went over 240 registers
for _key in [k for k in TILES if k[0] == "dz"]:
    TILES[("dz_stats",) + _key[1:]] = TILES[_key]
for _dt in (_BF, _FP):
    TILES[("dz_stats", 9, _dt)] = Tiles(128, 64, 64, 8, 3)      # 128x128x64: 255 regs, spills 8 B
    # with log sum p^2, the logit scales and the reverse KL (2026-12-01, Triton 3.9 and 3.6):
    TILES[("kl_fwd_stats", 8, _dt)] = Tiles(64, 64, 32, 8, 2)   # 64x64x32 x3 stages: 244 regs
    TILES[("kl_fwd_stats", 9, _dt)] = Tiles(64, 64, 32, 8, 3)   # 64x64x64: 248 regs under 3.6
TILES[("kl_dz", 8, _F32)] = Tiles(64, 64, 16, 4, 2)             # 3 stages: 242 regs under 3.6
# The frozen forward's logits tiles (kernels/frozen.py chunk_logits_kernel): the dz kernel's work
# shape, its config except where that spilled
for _key in [k for k in TILES if k[0] == "dz"]:
    TILES[("logits",) + _key[1:]] = TILES[_key]
for _dt in (_BF, _FP):
    TILES[("logits", 8, _dt)] = Tiles(128, 64, 32, 8, 3)        # 64x128x32: 8 B stack under 3.6 (specialised)
# The frozen forward's elementwise pass over a chunk (p, P = k p, the tile's partials; no dot):
# its own small tiles, independent of the logits kernel's
for _a in (8, 9):
    for _dt in (_BF, _FP, _F32):
        TILES[("probs", _a, _dt)] = Tiles(32, 128, 16, 8, 1)      # 4 warps: 255 regs (the KL pass)
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
    """torch.empty, or NaN-filled (integers: -1) under FUSEDPREF_POISON=1."""
    if os.environ.get("FUSEDPREF_POISON", "0") != "1":
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


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
