"""Per-token log-probabilities of a linear LM head, and the logit gradient for backward.

Forward (per valid row i, vocabulary split s):
    z[i, v]   = logit_tile(...)          (kernels/tiles.py: matmul, bias, soft-cap, scale)
    m_s, l_s  = running max and sum_v exp(z - m_s) over the split (online log-sum-exp)
    t_s       = z[i, y_i] if y_i falls in the split else 0
  The host combines splits: lse = M + log sum_s l_s exp(m_s - M), logp = sum_s t_s - lse.
  With STATS it also keeps sum_v z, S_s = sum_v exp(z - m_s) (z - m_s) (for the entropy
  H = lse - E_p[z] = log l - S / l, free of the cancellation of lse against E_p[z]), the
  first argmax of z and q_s = sum_v exp(2 (z - m_s)) (log sum_v p_v^2 = log q - 2 log l).
  When the max grows to m', S' = e^(m - m') (S + (m - m') l) + new terms, q' = e^(2(m - m')) q.

Backward (logit gradient for one vocabulary chunk, from the saved lse), for g = dL/dlogp and,
with STATS_GRAD, the upstream gradient of the statistics (tiles.stats_grad):
    dz[i, v] = g_i (onehot(y_i)[v] - p[i, v]) [+ stats_grad] , then head_chain (the cap's and
    the scale's derivative).
  dH and dW are then matmuls of the stored dz (host side, fusedpref/ops.py); with HAS_DB each
  program also writes its row block's fp32 column sums of dz, which the host adds into db.
"""
import triton
import triton.language as tl

from .tiles import (grouped_tile, head_chain, logit_tile, split_rows, stats_grad, stats_init, stats_step,
                    stats_store)


@triton.jit
def logprob_fwd_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, part_ptr, arg_ptr,
    N, V, D, v_per_split, n_splits,
    stride_hn, stride_hd, stride_wv, stride_wd,
    softcap, scale,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SCALE: tl.constexpr, STATS: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    # 0. program order: the split varies fastest (kernels/schedule.py)
    pid_s, row0, rows, row_mask = split_rows(tl.program_id(0), n_splits, N, BLOCK_N)
    h_blk = h_ptr + row0 * stride_hn
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    offs_v = tl.arange(0, BLOCK_V)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_N,), tl.float32)
    zy = tl.zeros((BLOCK_N,), tl.float32)
    if STATS:
        zsum, pz, amax, aidx, q = stats_init(BLOCK_N)

    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        # 1. logits of this vocabulary tile; columns past the split are -inf
        col_mask = offs_v < v_end - v0
        z = logit_tile(h_blk, stride_hn, stride_hd, w_ptr + v0 * stride_wv, stride_wv, stride_wd,
                       b_ptr + v0, softcap, scale, row_mask, col_mask, D,
                       BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_SOFTCAP, HAS_SCALE, DOT_FP32)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        # 2. online log-sum-exp: rescale the running sum to the new max
        tile_max = tl.max(z, axis=1)
        m_new = tl.maximum(m, tile_max)
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        if STATS:   # 4. sum of logits, shifted E_p[z - m], first argmax, sum p^2 (before l moves on)
            zsum, pz, amax, aidx, q = stats_step(zsum, pz, amax, aidx, q, z, p, col_mask, m, m_new, l, alpha,
                                                 tile_max, v0)
        l = l * alpha + tl.sum(p, axis=1)
        # 3. the target logit (exactly one tile of one split holds it)
        y_local = (y - v0).to(tl.int32)
        zy += tl.sum(tl.where(offs_v[None, :] == y_local[:, None], z, 0.0), axis=1)
        m = m_new

    # 5. partials [field, split, row]; the host combines the splits
    plane = n_splits * N
    out = part_ptr + pid_s * N + rows
    tl.store(out, m, mask=row_mask)
    tl.store(out + plane, l, mask=row_mask)
    tl.store(out + 2 * plane, zy, mask=row_mask)
    if STATS:
        stats_store(out, plane, arg_ptr + pid_s * N + rows, row_mask, zsum, pz, amax, aidx, q)


@triton.jit
def logprob_dz_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, gst_ptr, st_ptr, dz_ptr, db_ptr,
    N, V, D, v_lo, n_cols,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_dzn, stride_dbn,
    softcap, scale,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SCALE: tl.constexpr, STATS_GRAD: tl.constexpr,
    HAS_DB: tl.constexpr, DOT_FP32: tl.constexpr, GROUP_M: tl.constexpr,
):
    # 0. program order: GROUP_M row blocks per band of column tiles (kernels/schedule.py)
    row0, col0, rows, row_mask, offs_v, col_mask = grouped_tile(tl.program_id(0), N, n_cols, BLOCK_N, BLOCK_V,
                                                                GROUP_M)
    v0 = v_lo + col0                            # first vocabulary id of the tile
    # 1. recompute the logit tile
    z = logit_tile(h_ptr + row0 * stride_hn, stride_hn, stride_hd, w_ptr + v0 * stride_wv,
                   stride_wv, stride_wd, b_ptr + v0, softcap, scale, row_mask, col_mask, D,
                   BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_SOFTCAP, HAS_SCALE, DOT_FP32)
    y_local = (tl.load(y_ptr + rows, mask=row_mask, other=-1) - v0).to(tl.int32)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    # 2. dz = g * (onehot - softmax) [+ the statistics' gradient], times the cap's and the
    #    scale's derivative
    logp = z - lse[:, None]
    p = tl.exp(logp)
    dz = g[:, None] * (tl.where(offs_v[None, :] == y_local[:, None], 1.0, 0.0) - p)
    if STATS_GRAD:
        dz += stats_grad(p, logp, rows, row_mask, gst_ptr, st_ptr)
    dz = head_chain(dz, z, softcap, scale, HAS_SOFTCAP, HAS_SCALE)
    # 3. store in the operand dtype for the tensor-core matmuls that follow
    if HAS_DB:  # this row block's fp32 column sums (the host adds the row blocks: deterministic)
        colsum = tl.sum(tl.where(row_mask[:, None], dz, 0.0), axis=0)
        tl.store(db_ptr + (row0 // BLOCK_N) * stride_dbn + col0 + offs_v, colsum, mask=col_mask)
    ptrs = dz_ptr + row0 * stride_dzn + col0 + tl.arange(0, BLOCK_N)[:, None] * stride_dzn + offs_v[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
