"""The frozen-head forward (LoRA: the LM head gets no gradient): the log-probs and, in the same
sweep over the vocabulary, the hidden-state gradient direction of every row,

    d_i = k(z_iy) W[y_i] - sum_v p_iv k(z_iv) W[v]          (dlogp_i / dh_i; k = the cap's and
                                                             the scale's chain, tiles.head_chain)

so that backward is dH = g[:, None] * d: 2 N D V FLOPs for the logits and 2 N D V for the
softmax-weighted sum, none in backward (4 instead of 6). The [rows, D] fp32 accumulator of the
sum does not fit on chip at D = 4096, so the sweep goes by vocabulary chunks (fusedpref/ops.py):

    chunk_logits_kernel   z = logit tile -> z_buf [N, C] (fp32), the tile's row max -> tmax
    host                  m' = max(m, max_tiles tmax), alpha = exp(m - m')
    chunk_probs_kernel    p = exp(z - m'), P = head_chain(p) -> p_buf [N, C] (operand dtype) and
                          per-tile partials relative to m' (sum p, target logit, statistics)
    mm_acc_kernel         acc = alpha[:, None] * acc + P @ W[chunk]        (ROW_SCALE)

and d = k(z_y) W[y] - acc / l at the end, with l the sum of exp(z - m) over V.
"""
import triton
import triton.language as tl

from .tiles import chunk_tile, grouped_tile, head_chain, logit_tile, stats_init, stats_step

# fields of chunk_probs_kernel's per-tile partials part[field, tile, row]
FIELDS = {"l": 0, "zy": 1, "zsum": 2, "pz": 3, "amax": 4, "q": 5}


@triton.jit
def chunk_logits_kernel(
    h_ptr, w_ptr, b_ptr, z_ptr, tmax_ptr,
    N, V, D, v_lo, n_cols,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_zn,
    softcap, scale,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SCALE: tl.constexpr, DOT_FP32: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # program order: GROUP_M row blocks per band of column tiles (kernels/schedule.py)
    row0, col0, rows, row_mask, offs_v, col_mask = grouped_tile(tl.program_id(0), N, n_cols, BLOCK_N, BLOCK_V,
                                                                GROUP_M)
    v0 = v_lo + col0
    z = logit_tile(h_ptr + row0 * stride_hn, stride_hn, stride_hd, w_ptr + v0 * stride_wv, stride_wv, stride_wd,
                   b_ptr + v0, softcap, scale, row_mask, col_mask, D,
                   BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_SOFTCAP, HAS_SCALE, DOT_FP32)
    z = tl.where(col_mask[None, :], z, float("-inf"))
    tl.store(tmax_ptr + (col0 // BLOCK_V) * N + rows, tl.max(z, axis=1), mask=row_mask)
    ptrs = z_ptr + row0 * stride_zn + col0 + tl.arange(0, BLOCK_N)[:, None] * stride_zn + offs_v[None, :]
    tl.store(ptrs, z, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _load_chunk(ptr, row0, col0, stride, row_mask, col_mask, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """A tile of an fp32 chunk buffer: -inf past the chunk (its probability is 0 there), 0 on rows
    past N (finite throughout, never stored), and the same with 0 past the chunk (for the chain
    and the target)."""
    offs = row0 * stride + col0 + tl.arange(0, BLOCK_N)[:, None] * stride + tl.arange(0, BLOCK_V)[None, :]
    x = tl.load(ptr + offs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    return tl.where(col_mask[None, :], x, float("-inf")), tl.where(col_mask[None, :], x, 0.0)


@triton.jit
def _store_tile(ptr, x, row0, col0, stride, row_mask, col_mask, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    offs = row0 * stride + col0 + tl.arange(0, BLOCK_N)[:, None] * stride + tl.arange(0, BLOCK_V)[None, :]
    tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _tile_stats(out, plane, arg_out, row_mask, z, p, col_mask, m, v0, BLOCK_N: tl.constexpr):
    """This tile's statistics relative to m (tiles.stats_step from empty accumulators) into planes
    2..5 of out (FIELDS) and its first argmax into arg_out."""
    zsum, pz, amax, aidx, sq = stats_init(BLOCK_N)
    zero = tl.zeros((BLOCK_N,), tl.float32)
    zsum, pz, amax, aidx, sq = stats_step(zsum, pz, amax, aidx, sq, z, p, col_mask, m, m, zero, zero + 1.0,
                                          tl.max(z, axis=1), v0)
    tl.store(out + 2 * plane, zsum, mask=row_mask)
    tl.store(out + 3 * plane, pz, mask=row_mask)
    tl.store(out + 4 * plane, amax, mask=row_mask)
    tl.store(out + 5 * plane, sq, mask=row_mask)
    tl.store(arg_out, aidx, mask=row_mask)


@triton.jit
def chunk_probs_kernel(
    z_ptr, y_ptr, m_ptr, p_ptr, part_ptr, arg_ptr,
    N, v_lo, n_cols, n_tiles, stride_zn, stride_pn,
    softcap, scale,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_SCALE: tl.constexpr, STATS: tl.constexpr,
):
    pid_v = tl.program_id(0) % n_tiles
    row0, col0, rows, row_mask, offs_v, col_mask = chunk_tile(tl.program_id(0) // n_tiles, pid_v, N, n_cols,
                                                              BLOCK_N, BLOCK_V)
    z, zc = _load_chunk(z_ptr, row0, col0, stride_zn, row_mask, col_mask, BLOCK_N, BLOCK_V)
    m = tl.load(m_ptr + rows, mask=row_mask, other=0.0)
    # 1. probabilities relative to the running max, times the chain
    p = tl.exp(z - m[:, None])
    _store_tile(p_ptr, head_chain(p, zc, softcap, scale, HAS_SOFTCAP, HAS_SCALE), row0, col0, stride_pn, row_mask,
                col_mask, BLOCK_N, BLOCK_V)
    # 2. this tile's partials, all relative to m
    v0 = v_lo + col0
    y_local = (tl.load(y_ptr + rows, mask=row_mask, other=-1) - v0).to(tl.int32)
    plane = n_tiles * N
    out = part_ptr + pid_v * N + rows
    tl.store(out, tl.sum(p, axis=1), mask=row_mask)
    tl.store(out + plane, tl.sum(tl.where(offs_v[None, :] == y_local[:, None], zc, 0.0), axis=1), mask=row_mask)
    if STATS:
        _tile_stats(out, plane, arg_ptr + pid_v * N + rows, row_mask, z, p, col_mask, m, v0, BLOCK_N)


# fields of chunk_kl_probs_kernel's per-tile partials: FIELDS, then the reference's
KL_FIELDS = {**FIELDS, "l_r": 6, "ry": 7, "a": 8}


@triton.jit
def chunk_kl_probs_kernel(
    z_ptr, r_ptr, y_ptr, mz_ptr, mr_ptr, p_ptr, q_ptr, part_ptr, arg_ptr,
    N, v_lo, n_cols, n_tiles, stride_zn, stride_pn,
    softcap, scale,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_SCALE: tl.constexpr, STATS: tl.constexpr,
):
    # EXPO's frozen pass over one chunk tile of both heads' logits z (policy) and r (reference),
    # relative to the running maxes m_z, m_r: P = k(z) p and Q = k(z) p_ref (the policy's chain:
    # dKL/dh = sum_v (p_v - p_ref,v) k(z_v) W[v]), and the tile's partials
    pid_v = tl.program_id(0) % n_tiles
    row0, col0, rows, row_mask, offs_v, col_mask = chunk_tile(tl.program_id(0) // n_tiles, pid_v, N, n_cols,
                                                              BLOCK_N, BLOCK_V)
    z, zc = _load_chunk(z_ptr, row0, col0, stride_zn, row_mask, col_mask, BLOCK_N, BLOCK_V)
    r, rc = _load_chunk(r_ptr, row0, col0, stride_zn, row_mask, col_mask, BLOCK_N, BLOCK_V)
    m_z = tl.load(mz_ptr + rows, mask=row_mask, other=0.0)
    m_r = tl.load(mr_ptr + rows, mask=row_mask, other=0.0)
    p = tl.exp(z - m_z[:, None])
    q = tl.exp(r - m_r[:, None])
    _store_tile(p_ptr, head_chain(p, zc, softcap, scale, HAS_SOFTCAP, HAS_SCALE), row0, col0, stride_pn, row_mask,
                col_mask, BLOCK_N, BLOCK_V)
    _store_tile(q_ptr, head_chain(q, zc, softcap, scale, HAS_SOFTCAP, HAS_SCALE), row0, col0, stride_pn, row_mask,
                col_mask, BLOCK_N, BLOCK_V)
    v0 = v_lo + col0
    hit = offs_v[None, :] == (tl.load(y_ptr + rows, mask=row_mask, other=-1) - v0).to(tl.int32)[:, None]
    plane = n_tiles * N
    out = part_ptr + pid_v * N + rows
    tl.store(out, tl.sum(p, axis=1), mask=row_mask)
    tl.store(out + plane, tl.sum(tl.where(hit, zc, 0.0), axis=1), mask=row_mask)
    tl.store(out + 6 * plane, tl.sum(q, axis=1), mask=row_mask)
    tl.store(out + 7 * plane, tl.sum(tl.where(hit, rc, 0.0), axis=1), mask=row_mask)
    # KL(ref || policy)'s unnormalised expectation relative to both maxes (kernels/kl.py)
    diff = tl.where(col_mask[None, :], (rc - m_r[:, None]) - (zc - m_z[:, None]), 0.0)
    tl.store(out + 8 * plane, tl.sum(q * diff, axis=1), mask=row_mask)
    if STATS:
        _tile_stats(out, plane, arg_ptr + pid_v * N + rows, row_mask, z, p, col_mask, m_z, v0, BLOCK_N)


@triton.jit
def kept_dz_kernel(
    p_ptr, q_ptr, a_ptr, b_ptr, y_ptr, gy_ptr, db_ptr,
    N, v_lo, n_cols, n_tiles, stride_pn, stride_dbn,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, HAS_Q: tl.constexpr, HAS_DB: tl.constexpr,
):
    # The gradients-in-forward path's dz over one tile of a kept chunk (fusedpref._library.fused_loss),
    # in place: dz = a P + b Q + onehot(y) g_y with a, b, g_y per row (fp32), computed in fp32 and
    # rounded once to the buffer's dtype; with HAS_DB the tile's column sums of the unrounded dz
    # into db[row block, column] (summed over the row blocks by the host)
    pid_n = tl.program_id(0) // n_tiles
    row0, col0, rows, row_mask, offs_v, col_mask = chunk_tile(pid_n, tl.program_id(0) % n_tiles, N, n_cols,
                                                              BLOCK_N, BLOCK_V)
    mask = row_mask[:, None] & col_mask[None, :]
    offs = row0 * stride_pn + col0 + tl.arange(0, BLOCK_N)[:, None] * stride_pn + offs_v[None, :]
    a = tl.load(a_ptr + rows, mask=row_mask, other=0.0)
    dz = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32) * a[:, None]
    if HAS_Q:
        b = tl.load(b_ptr + rows, mask=row_mask, other=0.0)
        dz += tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32) * b[:, None]
    y_local = (tl.load(y_ptr + rows, mask=row_mask, other=-1) - (v_lo + col0)).to(tl.int32)
    g_y = tl.load(gy_ptr + rows, mask=row_mask, other=0.0)
    dz += tl.where(offs_v[None, :] == y_local[:, None], g_y[:, None], 0.0)
    tl.store(p_ptr + offs, dz.to(p_ptr.dtype.element_ty), mask=mask)
    if HAS_DB:
        tl.store(db_ptr + pid_n * stride_dbn + col0 + offs_v, tl.sum(tl.where(mask, dz, 0.0), axis=0), mask=col_mask)
