"""Divergences between two linear heads over the whole vocabulary, and optionally both heads'
target log-probs and the policy's statistics in the same pass (EXPO's whole per-token work: one
read of each head instead of three). The policy (student) gets the gradient; the reference
(teacher) none. Each head has its own hidden state, weight, bias, soft-cap and logit scale; the
hidden sizes and dtypes may differ.

One constexpr DIV (kernels/modes.py) selects the divergence in both kernels.

Forward (per valid row i, vocabulary split s), z = policy logits, r = reference logits:
    online log-sum-exp of z (m_z, l_z) and of r (m_r, l_r), and with DIV
      FORWARD_KL (KL(p_ref || p)):  a = sum_v exp(r_v - m_r) ((r_v - m_r) - (z_v - m_z))
      REVERSE_KL (KL(p || p_ref)):  a = sum_v exp(z_v - m_z) ((z_v - m_z) - (r_v - m_r))
      JSD: no KL term (the generalised JSD's first pass: both log-sum-exps only)
    a is kept relative to both running maxes: when they grow (m_r', m_z' for FORWARD_KL)
        a' = e^(m_r - m_r') (a + l_r ((m_r - m_r') - (m_z - m_z')))      (REVERSE_KL: roles swapped)
    (an expectation of raw logits would cancel against lse_r - lse_z at large logits).
  LOGP adds the target logits z[y_i], r[y_i]; STATS the policy's statistics (as logprobs.py).
  Partials go to fixed planes (fusedpref/_partials.py PLANES); the host combines splits (a moved to the global
  maxes the same way): FORWARD_KL: KL = a / l_r - log l_r + log l_z; REVERSE_KL: a / l_z - log l_z + log l_r.
  The JSD's second pass (jsd_fwd_kernel), given both lse, sums per split
    jsd = sum_v beta q_v (log q_v - log m_v) + (1 - beta) p_v (log p_v - log m_v),
    kls = sum_v p_v (log p_v - log m_v),          m = (1 - beta) p + beta q (p, q the softmaxes).

Backward (policy only), for g = dL/ddivergence, with LOGP g_lp = dL/dlogp, with STATS_GRAD the
statistics' upstream gradient (tiles.stats_grad):
    FORWARD_KL (KL(q || p)):   dz = g (p - q)
    REVERSE_KL (KL(p || q)):   dz = g p (log p - log q - KL)            aux = KL
    JSD:                       dz = g (1 - beta) p (log p - log m - kls)   aux = kls
    + g_lp (onehot(y) - p) [+ stats_grad], then head_chain (the policy's cap and scale).
"""
import triton
import triton.language as tl

from .modes import FORWARD_KL, JSD, REVERSE_KL
from .tiles import (grouped_tile, head_chain, logit_tile, split_rows, stats_grad, stats_init, stats_step,
                    stats_store)


@triton.jit
def kl_fwd_kernel(
    h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr, y_ptr, part_ptr, arg_ptr,
    N, V, D, RD, v_per_split, n_splits,
    stride_hn, stride_hd, stride_wv, stride_wd,
    stride_rhn, stride_rhd, stride_rwv, stride_rwd,
    softcap, scale, ref_softcap, ref_scale,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_REF_SOFTCAP: tl.constexpr, HAS_REF_SCALE: tl.constexpr, DIV: tl.constexpr,
    LOGP: tl.constexpr, STATS: tl.constexpr,
    DOT_FP32: tl.constexpr, REF_DOT_FP32: tl.constexpr,
):
    # 0. program order: the split varies fastest (kernels/schedule.py)
    pid_s, row0, rows, row_mask = split_rows(tl.program_id(0), n_splits, N, BLOCK_N)
    h_blk = h_ptr + row0 * stride_hn
    rh_blk = rh_ptr + row0 * stride_rhn
    offs_v = tl.arange(0, BLOCK_V)
    m_z = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l_z = tl.zeros((BLOCK_N,), tl.float32)
    m_r = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l_r = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    if LOGP:
        y = tl.load(y_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
        zy = tl.zeros((BLOCK_N,), tl.float32)
        ry = tl.zeros((BLOCK_N,), tl.float32)
    if STATS:
        zsum, pz, amax, aidx, q = stats_init(BLOCK_N)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        col_mask = offs_v < v_end - v0
        # 1. both heads' logit tiles; columns past the split are -inf
        z = logit_tile(h_blk, stride_hn, stride_hd, w_ptr + v0 * stride_wv, stride_wv, stride_wd,
                       b_ptr + v0, softcap, scale, row_mask, col_mask, D,
                       BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_SOFTCAP, HAS_SCALE, DOT_FP32)
        r = logit_tile(rh_blk, stride_rhn, stride_rhd, rw_ptr + v0 * stride_rwv, stride_rwv, stride_rwd,
                       rb_ptr + v0, ref_softcap, ref_scale, row_mask, col_mask, RD,
                       BLOCK_N, BLOCK_V, BLOCK_D, HAS_REF_BIAS, HAS_REF_SOFTCAP, HAS_REF_SCALE, REF_DOT_FP32)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        r = tl.where(col_mask[None, :], r, float("-inf"))
        # 2. online log-sum-exp of both heads
        tile_max = tl.max(z, axis=1)
        mz_new = tl.maximum(m_z, tile_max)
        alpha_z = tl.exp(m_z - mz_new)
        p = tl.exp(z - mz_new[:, None])
        if STATS:   # the policy's statistics (before l_z moves on)
            zsum, pz, amax, aidx, q = stats_step(zsum, pz, amax, aidx, q, z, p, col_mask, m_z, mz_new, l_z,
                                                 alpha_z, tile_max, v0)
        mr_new = tl.maximum(m_r, tl.max(r, axis=1))
        alpha_r = tl.exp(m_r - mr_new)
        pr = tl.exp(r - mr_new[:, None])
        # 3. the KL's unnormalised expectation, relative to both running maxes: move a to the
        #    new maxes (nothing to move before the first tile), add this tile
        diff = (tl.where(col_mask[None, :], r - mr_new[:, None], 0.0)
                - tl.where(col_mask[None, :], z - mz_new[:, None], 0.0))      # no -inf - -inf
        if DIV == FORWARD_KL:
            started = l_r > 0
            shift = tl.where(started, m_r - mr_new, 0.0) - tl.where(started, m_z - mz_new, 0.0)
            a = alpha_r * (a + l_r * shift) + tl.sum(pr * diff, axis=1)
        elif DIV == REVERSE_KL:
            started = l_z > 0
            shift = tl.where(started, m_z - mz_new, 0.0) - tl.where(started, m_r - mr_new, 0.0)
            a = alpha_z * (a + l_z * shift) - tl.sum(p * diff, axis=1)
        l_z = l_z * alpha_z + tl.sum(p, axis=1)
        l_r = l_r * alpha_r + tl.sum(pr, axis=1)
        m_r = mr_new
        # 4. target logits of both heads (one tile of one split holds the target)
        if LOGP:
            hit = offs_v[None, :] == (y - v0).to(tl.int32)[:, None]
            zy += tl.sum(tl.where(hit, z, 0.0), axis=1)
            ry += tl.sum(tl.where(hit, r, 0.0), axis=1)
        m_z = mz_new
    # 5. partials [plane, split, row] (planes as in fusedpref/_partials.py PLANES)
    plane = n_splits * N
    out = part_ptr + pid_s * N + rows
    tl.store(out, m_z, mask=row_mask)
    tl.store(out + plane, l_z, mask=row_mask)
    tl.store(out + 7 * plane, m_r, mask=row_mask)
    tl.store(out + 8 * plane, l_r, mask=row_mask)
    if DIV != JSD:
        tl.store(out + 9 * plane, a, mask=row_mask)
    if LOGP:
        tl.store(out + 2 * plane, zy, mask=row_mask)
        tl.store(out + 10 * plane, ry, mask=row_mask)
    if STATS:
        stats_store(out, plane, arg_ptr + pid_s * N + rows, row_mask, zsum, pz, amax, aidx, q)


@triton.jit
def _log_mixture(logp, logq, log_1mb, log_b):
    """log((1 - beta) p + beta q) from log p, log q (finite) and log(1 - beta), log(beta)."""
    x = logp + log_1mb
    y = logq + log_b
    top = tl.maximum(x, y)
    return top + tl.log(tl.exp(x - top) + tl.exp(y - top))


@triton.jit
def jsd_fwd_kernel(
    h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr, lse_ptr, rlse_ptr, part_ptr,
    N, V, D, RD, v_per_split, n_splits,
    stride_hn, stride_hd, stride_wv, stride_wd,
    stride_rhn, stride_rhd, stride_rwv, stride_rwd,
    softcap, scale, ref_softcap, ref_scale, beta, log_1mb, log_b,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_REF_SOFTCAP: tl.constexpr, HAS_REF_SCALE: tl.constexpr,
    DOT_FP32: tl.constexpr, REF_DOT_FP32: tl.constexpr,
):
    # the generalised JSD's second pass: partials part[2, split, row] = (jsd, kls)
    pid_s, row0, rows, row_mask = split_rows(tl.program_id(0), n_splits, N, BLOCK_N)
    offs_v = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    rlse = tl.load(rlse_ptr + rows, mask=row_mask, other=0.0)
    jsd = tl.zeros((BLOCK_N,), tl.float32)
    kls = tl.zeros((BLOCK_N,), tl.float32)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        col_mask = offs_v < v_end - v0
        z = logit_tile(h_ptr + row0 * stride_hn, stride_hn, stride_hd, w_ptr + v0 * stride_wv, stride_wv,
                       stride_wd, b_ptr + v0, softcap, scale, row_mask, col_mask, D,
                       BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_SOFTCAP, HAS_SCALE, DOT_FP32)
        r = logit_tile(rh_ptr + row0 * stride_rhn, stride_rhn, stride_rhd, rw_ptr + v0 * stride_rwv,
                       stride_rwv, stride_rwd, rb_ptr + v0, ref_softcap, ref_scale, row_mask, col_mask, RD,
                       BLOCK_N, BLOCK_V, BLOCK_D, HAS_REF_BIAS, HAS_REF_SOFTCAP, HAS_REF_SCALE, REF_DOT_FP32)
        logp = z - lse[:, None]          # finite everywhere (masked columns are dropped below)
        logq = r - rlse[:, None]
        logm = _log_mixture(logp, logq, log_1mb, log_b)
        kl_p = tl.where(col_mask[None, :], tl.exp(logp) * (logp - logm), 0.0)
        kl_q = tl.where(col_mask[None, :], tl.exp(logq) * (logq - logm), 0.0)
        kls += tl.sum(kl_p, axis=1)
        jsd += tl.sum(beta * kl_q + (1.0 - beta) * kl_p, axis=1)
    plane = n_splits * N
    out = part_ptr + pid_s * N + rows
    tl.store(out, jsd, mask=row_mask)
    tl.store(out + plane, kls, mask=row_mask)


@triton.jit
def kl_dz_kernel(
    h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr, lse_ptr, rlse_ptr, g_ptr, aux_ptr, y_ptr, glp_ptr,
    gst_ptr, st_ptr, dz_ptr, db_ptr,
    N, V, D, RD, v_lo, n_cols,
    stride_hn, stride_hd, stride_wv, stride_wd,
    stride_rhn, stride_rhd, stride_rwv, stride_rwd, stride_dzn, stride_dbn,
    softcap, scale, ref_softcap, ref_scale, beta, log_1mb, log_b,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_REF_SOFTCAP: tl.constexpr, HAS_REF_SCALE: tl.constexpr, DIV: tl.constexpr,
    LOGP: tl.constexpr, STATS_GRAD: tl.constexpr, HAS_DB: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr, REF_DOT_FP32: tl.constexpr,
):
    # 0. program order: GROUP_M row blocks per band of column tiles (kernels/schedule.py)
    row0, col0, rows, row_mask, offs_v, col_mask = grouped_tile(tl.program_id(0), N, n_cols, BLOCK_N, BLOCK_V,
                                                                GROUP_M)
    v0 = v_lo + col0
    # 1. recompute both tiles
    z = logit_tile(h_ptr + row0 * stride_hn, stride_hn, stride_hd, w_ptr + v0 * stride_wv, stride_wv,
                   stride_wd, b_ptr + v0, softcap, scale, row_mask, col_mask, D,
                   BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_SOFTCAP, HAS_SCALE, DOT_FP32)
    r = logit_tile(rh_ptr + row0 * stride_rhn, stride_rhn, stride_rhd, rw_ptr + v0 * stride_rwv, stride_rwv,
                   stride_rwd, rb_ptr + v0, ref_softcap, ref_scale, row_mask, col_mask, RD,
                   BLOCK_N, BLOCK_V, BLOCK_D, HAS_REF_BIAS, HAS_REF_SOFTCAP, HAS_REF_SCALE, REF_DOT_FP32)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    rlse = tl.load(rlse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    # 2. the divergence's gradient w.r.t. the policy logits [+ g_lp (onehot - p)] [+ stats]
    logp = z - lse[:, None]
    logq = r - rlse[:, None]
    p = tl.exp(logp)
    if DIV == FORWARD_KL:
        dz = g[:, None] * (p - tl.exp(logq))
    elif DIV == REVERSE_KL:
        aux = tl.load(aux_ptr + rows, mask=row_mask, other=0.0)
        dz = g[:, None] * p * (logp - logq - aux[:, None])
    else:   # JSD
        aux = tl.load(aux_ptr + rows, mask=row_mask, other=0.0)
        logm = _log_mixture(logp, logq, log_1mb, log_b)
        dz = (g * (1.0 - beta))[:, None] * p * (logp - logm - aux[:, None])
    if LOGP:
        g_lp = tl.load(glp_ptr + rows, mask=row_mask, other=0.0)
        y_local = (tl.load(y_ptr + rows, mask=row_mask, other=-1) - v0).to(tl.int32)
        dz += g_lp[:, None] * (tl.where(offs_v[None, :] == y_local[:, None], 1.0, 0.0) - p)
    if STATS_GRAD:
        dz += stats_grad(p, logp, rows, row_mask, gst_ptr, st_ptr)
    dz = head_chain(dz, z, softcap, scale, HAS_SOFTCAP, HAS_SCALE)
    if HAS_DB:  # this row block's fp32 column sums (the host adds the row blocks: deterministic)
        colsum = tl.sum(tl.where(row_mask[:, None], dz, 0.0), axis=0)
        tl.store(db_ptr + (row0 // BLOCK_N) * stride_dbn + col0 + offs_v, colsum, mask=col_mask)
    ptrs = dz_ptr + row0 * stride_dzn + col0 + tl.arange(0, BLOCK_N)[:, None] * stride_dzn + offs_v[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
