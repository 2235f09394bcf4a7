"""The launch schedule of the Triton backend and the traffic model behind it (one source of
truth: fusedpref.ops launches with these functions, `fusedpref roofline` models with them).

Program order (kernels/schedule.py): blocks are dispatched in increasing linear program id and
each SM runs PROGRAMS_PER_SM head programs at a time (their registers fill the register file),
so the P = SMs x PROGRAMS_PER_SM programs resident at once are P neighbouring ids.

Forward (split-major): program (row block r, split s) streams split s's vocabulary tiles against
its H block, re-reading the H block once per tile (D does not fit on chip). With the split
fastest, the resident programs cover R = ceil(P / S) row blocks; when R H blocks fit in half the
L2 they are read from HBM once, and the R programs of one split read the same W tile at about
the same time, so each "wave" of resident programs reads W once:
    bytes_fwd ~= waves * V*D*e + N*D*e,   waves = ceil(n_blocks * S / P)
so S is the smallest split count whose R H blocks fit (more splits only add W waves), and at
least enough for P programs in all. (Row-major order, R = min(n_blocks, P), re-reads H per tile:
n_blocks * V/BLOCK_V * BLOCK_N*D*e, ~270 GB at the main shape.)

Backward, per vocabulary chunk of C columns: dz (grouped: GROUP_M row blocks x a band of column
tiles resident, H band and W tiles in L2), dW = dz^T H (cuBLAS), dH += dz W (grouped mm_acc with
an fp32 accumulator read and written once per chunk: 8*N*D bytes). Fewer, larger chunks cut the
accumulator traffic and H re-reads at the price of an N x C buffer; DEFAULT_CHUNK_COLS columns
(capped at DEFAULT_CHUNK_MB) is where that traffic drops under a tenth of the matmul time at the
main shape (N=16384, D=4096, V=128256, bf16).
"""
from __future__ import annotations

from dataclasses import dataclass

PROGRAMS_PER_SM = 1          # the head kernels' registers (8 warps x ~200-255) fill the register file
GROUP_M = 8                  # row tiles per band in the grouped order (dz, mm_acc)
DEFAULT_CHUNK_COLS = 8192    # backward vocabulary chunk (Triton backend) ...
DEFAULT_CHUNK_MB = 256       # ... capped at this many MiB of dz buffer


def cdiv(a, b):
    return -(-a // b)


def forward_splits(n_rows, vocab, d, elem, block_n, block_v, sms, l2_bytes, programs_per_sm=PROGRAMS_PER_SM):
    """Vocabulary splits S of the forward kernels (see the module docstring)."""
    n_blocks = cdiv(n_rows, block_n)
    v_tiles = cdiv(vocab, block_v)
    resident = sms * programs_per_sm
    h_block = block_n * d * elem
    s = max(1, cdiv(resident, n_blocks))                      # enough programs to fill the GPU
    while s < v_tiles and cdiv(resident, s) * h_block > l2_bytes // 2:
        s += 1                                                # until the resident H blocks fit
    return min(s, v_tiles)


def split_layout(n_rows, vocab, block_n, block_v, splits):
    """(row blocks, vocabulary per split (a multiple of block_v), number of non-empty splits)."""
    v_tiles = cdiv(vocab, block_v)
    v_per_split = cdiv(v_tiles, splits) * block_v
    return cdiv(n_rows, block_n), v_per_split, cdiv(vocab, v_per_split)


@dataclass(frozen=True)
class GPU:
    name: str
    arch: int                 # compute capability major (tile table of fusedpref.config)
    sms: int
    l2_mb: float
    hbm_tbs: float            # HBM bandwidth, TB/s
    dense_tflops: dict        # dtype -> dense tensor-core TFLOP/s (datasheet); fp32 runs as tf32x3


GPUS = {
    "H200": GPU("H200", 9, 132, 50, 4.8, {"bf16": 989, "fp16": 989, "fp32": 989 / 3}),
    "H100": GPU("H100 SXM", 9, 132, 50, 3.35, {"bf16": 989, "fp16": 989, "fp32": 989 / 3}),
    "A100": GPU("A100 80GB SXM", 8, 108, 40, 2.04, {"bf16": 312, "fp16": 312, "fp32": 312 / 3}),
}


def _fwd_bytes(n, d, v, e, block_n, block_v, splits, sms, l2, split_fastest=True):
    n_blocks = cdiv(n, block_n)
    resident = sms * PROGRAMS_PER_SM
    h_block = block_n * d * e
    rows_resident = cdiv(resident, splits) if split_fastest else min(n_blocks, resident)
    if rows_resident * h_block <= l2 // 2:
        h = n * d * e
    else:                                   # every program re-reads its H block per vocabulary tile
        h = n_blocks * cdiv(v, block_v) * h_block
    waves = cdiv(n_blocks * splits, resident)
    return h + waves * v * d * e + n * splits * 6 * 4


def budget_cols_fp32(n, v, block_v):
    """The one-pass frozen forward's chunk columns: its fp32 logits buffer within the budget."""
    from ._chunks import budget_cols

    return budget_cols(n, v, 4, block_v, DEFAULT_CHUNK_MB * 2**20, DEFAULT_CHUNK_COLS)


KEPT_MB_CUDA = 1024          # the gradients-in-forward path's kept budget on CUDA (fusedpref.config.kept_bytes)


def model(n, d, v, dtype="bf16", gpu="H200", chunk_cols=None, frozen=False, frozen_path="one-pass", kept=False,
          kept_mb=KEPT_MB_CUDA, pair_rows=4096):
    """Per-kernel FLOPs, modelled HBM bytes and lower-bound ms of the trainable (or frozen) head's
    forward + backward at N valid rows, under the launch schedule above. A frozen head takes the
    one-pass path (kernels/frozen.py) unless frozen_path="standard"; kept=True models the trainable
    head's gradients-in-forward path (one head, chunks of pairs of pair_rows rows within kept_mb).
    An ESTIMATE."""
    g = GPUS[gpu]
    e = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
    peak = g.dense_tflops[dtype] * 1e12
    bw = g.hbm_tbs * 1e12
    l2 = int(g.l2_mb * 2**20)
    import torch

    from . import config

    t = config.TILES[("fwd", g.arch, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])]
    block_n, block_v = t.BLOCK_N, t.BLOCK_V
    splits = forward_splits(n, v, d, e, block_n, block_v, g.sms, l2)
    if chunk_cols is None:
        from ._chunks import budget_cols

        chunk_cols = budget_cols(n, v, e, block_v, DEFAULT_CHUNK_MB * 2**20, DEFAULT_CHUNK_COLS)
    chunks = cdiv(v, chunk_cols)
    nd, vd, nv = n * d * e, v * d * e, n * v * e
    n_blocks = cdiv(n, block_n)
    bands = cdiv(n_blocks, GROUP_M)
    rows = []

    def add(kernel, flops, bytes_, note):
        rows.append({"kernel": kernel, "gflop": flops / 1e9, "gbytes": bytes_ / 1e9,
                     "compute_ms": flops / peak * 1e3, "memory_ms": bytes_ / bw * 1e3,
                     "bound_ms": max(flops / peak, bytes_ / bw) * 1e3, "note": note})

    mm_bands = cdiv(n, 128 * GROUP_M)
    if kept and not frozen and kept_mb * 2**20 >= pair_rows * v * e:    # (no pair fits: the recompute path)
        return _kept_model(n, d, v, e, g, peak, block_v, chunk_cols, kept_mb, pair_rows, add, rows)
    if frozen and frozen_path == "one-pass":
        # per chunk: logits tiles (W chunk once per band, H once) -> fp32 z; p and P = k p; then
        # acc = alpha acc + P W_chunk (fp32 RMW); backward: dH = g d
        f_chunks = cdiv(v, min(chunk_cols, budget_cols_fp32(n, v, block_v)))
        add("forward chunk_logits", 2 * n * d * v, bands * vd + f_chunks * nd + 4 * n * v,
            f"{f_chunks} chunks, fp32 logits out")
        add("forward chunk_probs", 0, 4 * n * v + n * v * e, "reads fp32 z, writes P")
        add("forward acc = a acc + P W", 2 * n * d * v, n * v * e + mm_bands * vd + f_chunks * 8 * n * d,
            "fp32 accumulator RMW per chunk")
        add("forward d = k W[y] - acc / l", 0, nd + 2 * 4 * n * d, "gather, fp32 direction out")
        add("backward dH = g d", 0, 4 * n * d + nd, "elementwise")
        total = sum(r["bound_ms"] for r in rows)
        floor = 4 * n * d * v / peak * 1e3
        return rows, {"gpu": g.name, "dtype": dtype, "splits": 0, "chunk_cols": chunk_cols, "chunks": f_chunks, "units": 4,
                      "total_bound_ms": total, "floor_ms": floor, "ratio": total / floor,
                      "row_major_fwd_gbytes": 0.0}
    add("forward (logprob_fwd)", 2 * n * d * v, _fwd_bytes(n, d, v, e, block_n, block_v, splits, g.sms, l2),
        f"{block_n}x{block_v} tiles, {splits} splits, split-major")
    # dz: per chunk each band reads the W chunk once, H once per chunk, writes dz
    add("backward dz (recompute)", 2 * n * d * v, bands * vd + chunks * nd + nv, f"{chunks} chunks of {chunk_cols}")
    if not frozen:
        add("backward dW = dz^T H", 2 * n * d * v, nv + chunks * nd + vd, "cuBLAS per chunk")
    add("backward dH += dz W", 2 * n * d * v, nv + mm_bands * vd + chunks * 8 * n * d, "fp32 accumulator RMW per chunk")
    total = sum(r["bound_ms"] for r in rows)
    floor = (6 if frozen else 8) * n * d * v / peak * 1e3
    return rows, {"gpu": g.name, "dtype": dtype, "splits": splits, "chunk_cols": chunk_cols, "chunks": chunks,
                  "units": 6 if frozen else 8,
                  "total_bound_ms": total, "floor_ms": floor, "ratio": total / floor,
                  "row_major_fwd_gbytes": _fwd_bytes(n, d, v, e, block_n, block_v, splits, g.sms, l2,
                                                     split_fastest=False) / 1e9}


def _kept_model(n, d, v, e, g, peak, block_v, chunk_cols, kept_mb, pair_rows, add, rows):
    """The gradients-in-forward path (fusedpref._library.fused_loss on the Triton backend): per
    chunk of pairs (K of them, as many pairs as kept_mb of [rows, V] operand-dtype P holds) the
    frozen sweep's chunk_logits (fp32 z out) and chunk_probs (P into the kept buffer), then per
    vocabulary chunk kept_dz_kernel (P read, dz written in place, once), dW by cuBLAS into the fp32
    accumulator (a per-chunk partial in the operand dtype, upcast, added: RMW of the accumulator per
    pair chunk), dH by mm_acc."""
    rows_fit = int(kept_mb * 2**20 // (v * e) // pair_rows) * pair_rows
    n_c = min(n, rows_fit)
    k = cdiv(n, n_c)
    f_chunks = cdiv(v, min(chunk_cols, budget_cols_fp32(n_c, v, block_v)))
    bands_c = cdiv(cdiv(n_c, 128), GROUP_M)
    mm_bands_c = cdiv(n_c, 128 * GROUP_M)
    nd, vd, nv = n * d * e, v * d * e, n * v * e
    add("forward chunk_logits", 2 * n * d * v, k * bands_c * vd + f_chunks * nd + 4 * n * v,
        f"{k} pair chunks of {n_c} rows, {f_chunks} vocabulary chunks, fp32 logits out")
    add("forward chunk_probs -> kept P", 0, 4 * n * v + nv, "reads fp32 z, writes P (operand dtype)")
    add("kept_dz (dz from P, in place)", 0, 2 * nv + 4 * cdiv(n, 64) * v, "P in, dz out, db column partials")
    add("dW += dz^T H", 2 * n * d * v, nv + f_chunks * nd + k * v * d * (2 * e + 12), "cuBLAS per chunk, fp32 RMW")
    add("dH += dz W", 2 * n * d * v, nv + k * mm_bands_c * vd + f_chunks * 8 * n * d, "mm_acc, fp32 accumulator")
    total = sum(r["bound_ms"] for r in rows)
    floor = 6 * n * d * v / peak * 1e3
    return rows, {"gpu": g.name, "dtype": {2: "16-bit", 4: "fp32"}[e], "splits": 0, "chunk_cols": chunk_cols,
                  "chunks": f_chunks, "units": 6, "pair_chunks": k, "total_bound_ms": total, "floor_ms": floor,
                  "ratio": total / floor, "row_major_fwd_gbytes": 0.0}


def print_model(rows, summary, shape):
    n, d, v = shape
    print(f"# fusedpref roofline (ESTIMATES, not measurements): {summary['gpu']}, {summary['dtype']}, "
          f"N={n} valid rows, D={d}, V={v}")
    print("| kernel | GFLOP | modelled HBM GB | compute ms | memory ms | lower bound ms | schedule |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['gflop']:.0f} | {r['gbytes']:.2f} | {r['compute_ms']:.2f} | "
              f"{r['memory_ms']:.2f} | {r['bound_ms']:.2f} | {r['note']} |")
    tail = (f"; row-major forward would move {summary['row_major_fwd_gbytes']:.0f} GB"
            if summary["row_major_fwd_gbytes"] else "")
    print(f"# total lower bound {summary['total_bound_ms']:.1f} ms = {summary['ratio']:.3f} x the "
          f"{summary['units']}*N*D*V floor ({summary['floor_ms']:.1f} ms at the datasheet peak){tail}")
    if "pair_chunks" in summary:
        print(f"# gradients in forward: {summary['pair_chunks']} chunks of pairs within the kept budget")


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="fusedpref roofline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16384, help="valid (non-ignored) rows (default: %(default)s)")
    p.add_argument("--d", type=int, default=4096, help="hidden size (default: %(default)s)")
    p.add_argument("--v", type=int, default=128256, help="vocabulary size (default: %(default)s)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="default: %(default)s")
    p.add_argument("--gpu", default="H200", choices=sorted(GPUS), help="default: %(default)s")
    p.add_argument("--chunk-cols", type=int, default=None, help="backward chunk columns (default: the schedule's)")
    p.add_argument("--frozen", action="store_true", help="frozen head: no dW (the one-pass path)")
    p.add_argument("--frozen-path", choices=["one-pass", "standard"], default="one-pass",
                   help="with --frozen: the one-pass path (default) or the standard 6 N D V one")
    p.add_argument("--kept", action="store_true",
                   help="the trainable head's gradients-in-forward path (6 N D V) instead of the recompute path")
    p.add_argument("--kept-mb", type=float, default=KEPT_MB_CUDA, help="with --kept: the kept budget (MiB)")
    p.add_argument("--pair-rows", type=int, default=4096, help="with --kept: valid rows per pair")
    a = p.parse_args(argv)
    for flag in ("n", "d", "v"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag} must be a whole number >= 1, got {getattr(a, flag)}")
    if a.chunk_cols is not None and a.chunk_cols < 1:
        p.error(f"--chunk-cols must be a whole number >= 1, got {a.chunk_cols}")
    if a.kept and a.frozen:
        p.error("--kept models a trainable head (a frozen one takes the one-pass path)")
    if not a.kept_mb > 0 or a.pair_rows < 1:
        p.error("--kept-mb must be > 0 and --pair-rows >= 1")
    rows, summary = model(a.n, a.d, a.v, a.dtype, a.gpu, chunk_cols=a.chunk_cols, frozen=a.frozen,
                          frozen_path=a.frozen_path, kept=a.kept, kept_mb=a.kept_mb, pair_rows=a.pair_rows)
    print_model(rows, summary, (a.n, a.d, a.v))
    return 0

