"""Exact per-token KL(p_ref || p_theta) over the vocabulary between two linear heads.

Forward (per valid row i, vocabulary split s), with z = policy logits, r = reference logits
(each from its own hidden state and weight; the hidden sizes and dtypes may differ):
    online log-sum-exp of z (m_z, l_z) and of r (m_r, l_r), and
    a = sum_v exp(r_v - m_r) (r_v - z_v)          (rescaled with l_r when m_r grows)
  The host combines splits: KL = a / l_r - lse_r + lse_z  (= E_{p_ref}[r - z] - lse_r + lse_z).

Backward (policy only; the reference gets no gradient):
    dz[i, v] = g_i * (softmax(z)_v - softmax(r)_v) * dcap(z)
"""
import triton
import triton.language as tl

from .tiles import logit_tile


@triton.jit
def kl_fwd_kernel(
    h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr, part_ptr,
    N, V, D, RD, v_per_split, n_splits,
    stride_hn, stride_hd, stride_wv, stride_wd,
    stride_rhn, stride_rhd, stride_rwv, stride_rwd,
    softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr, REF_DOT_FP32: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    row0 = pid_n * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    h_blk = h_ptr + row0 * stride_hn
    rh_blk = rh_ptr + row0 * stride_rhn
    offs_v = tl.arange(0, BLOCK_V)
    m_z = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l_z = tl.zeros((BLOCK_N,), tl.float32)
    m_r = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l_r = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        col_mask = offs_v < v_end - v0
        # 1. both heads' logit tiles; columns past the split are -inf
        z = logit_tile(h_blk, stride_hn, stride_hd, w_ptr + v0 * stride_wv, stride_wv, stride_wd,
                       b_ptr + v0, softcap, row_mask, col_mask, D,
                       BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_SOFTCAP, DOT_FP32)
        r = logit_tile(rh_blk, stride_rhn, stride_rhd, rw_ptr + v0 * stride_rwv, stride_rwv, stride_rwd,
                       rb_ptr + v0, softcap, row_mask, col_mask, RD,
                       BLOCK_N, BLOCK_V, BLOCK_D, HAS_REF_BIAS, HAS_SOFTCAP, REF_DOT_FP32)
        diff = tl.where(col_mask[None, :], r - z, 0.0)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        r = tl.where(col_mask[None, :], r, float("-inf"))
        # 2. online log-sum-exp of the policy
        mz_new = tl.maximum(m_z, tl.max(z, axis=1))
        l_z = l_z * tl.exp(m_z - mz_new) + tl.sum(tl.exp(z - mz_new[:, None]), axis=1)
        m_z = mz_new
        # 3. online log-sum-exp of the reference and the unnormalised E_ref[r - z]
        mr_new = tl.maximum(m_r, tl.max(r, axis=1))
        alpha = tl.exp(m_r - mr_new)
        pr = tl.exp(r - mr_new[:, None])
        l_r = l_r * alpha + tl.sum(pr, axis=1)
        a = a * alpha + tl.sum(pr * diff, axis=1)
        m_r = mr_new
    # 4. partials [field, split, row]
    plane = n_splits * N
    out = part_ptr + pid_s * N + rows
    tl.store(out, m_z, mask=row_mask)
    tl.store(out + plane, l_z, mask=row_mask)
    tl.store(out + 2 * plane, m_r, mask=row_mask)
    tl.store(out + 3 * plane, l_r, mask=row_mask)
    tl.store(out + 4 * plane, a, mask=row_mask)


@triton.jit
def kl_dz_kernel(
    h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr, lse_ptr, rlse_ptr, g_ptr, dz_ptr,
    N, V, D, RD, v_lo, n_cols,
    stride_hn, stride_hd, stride_wv, stride_wd,
    stride_rhn, stride_rhd, stride_rwv, stride_rwd, stride_dzn,
    softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr, REF_DOT_FP32: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    row0 = pid_n * BLOCK_N
    col0 = pid_v * BLOCK_V
    rows = row0 + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    offs_v = tl.arange(0, BLOCK_V)
    col_mask = offs_v < n_cols - col0
    v0 = v_lo + col0
    # 1. recompute both tiles
    z = logit_tile(h_ptr + row0 * stride_hn, stride_hn, stride_hd, w_ptr + v0 * stride_wv, stride_wv,
                   stride_wd, b_ptr + v0, softcap, row_mask, col_mask, D,
                   BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_SOFTCAP, DOT_FP32)
    r = logit_tile(rh_ptr + row0 * stride_rhn, stride_rhn, stride_rhd, rw_ptr + v0 * stride_rwv, stride_rwv,
                   stride_rwd, rb_ptr + v0, softcap, row_mask, col_mask, RD,
                   BLOCK_N, BLOCK_V, BLOCK_D, HAS_REF_BIAS, HAS_SOFTCAP, REF_DOT_FP32)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    rlse = tl.load(rlse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    # 2. dz = g * (p_theta - p_ref), times the soft-cap derivative of the policy logits
    dz = g[:, None] * (tl.exp(z - lse[:, None]) - tl.exp(r - rlse[:, None]))
    if HAS_SOFTCAP:
        c = z / softcap
        dz = dz * (1.0 - c * c)
    ptrs = dz_ptr + row0 * stride_dzn + col0 + tl.arange(0, BLOCK_N)[:, None] * stride_dzn + offs_v[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
