"""Building blocks shared by the kernels: one logit tile of a linear LM head.

    z[r, c] = sum_d h[r, d] * w[c, d]  (+ b[c])          fp32 accumulation
    z       = softcap * tanh(z / softcap)                 when HAS_SOFTCAP (Gemma-2 style)
    z       = scale * z                                   when HAS_SCALE (a logit scale over a
                                                          temperature, after the cap: TRL's order)
The backward chain rule of that transform is head_chain; the gradient of the statistics that
stats_step accumulates (all but the argmax hit are differentiable) is stats_grad.
"""
import triton
import triton.language as tl

from .schedule import grouped, split_major


@triton.jit
def split_rows(pid, n_splits, N, BLOCK_N: tl.constexpr):
    """(split, first row, rows, row mask) of a forward program (split-major order); int64 scalars."""
    pid_n, pid_s = split_major(pid, n_splits)
    row0 = pid_n.to(tl.int64) * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    return pid_s.to(tl.int64), row0, rows, rows < N


@triton.jit
def chunk_tile(pid_n, pid_v, N, n_cols, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """(first row, first column in the chunk, rows, row mask, in-tile columns, column mask) of the
    tile (pid_n, pid_v) of a rows x n_cols chunk; int64 scalars, int32 in-tile offsets."""
    row0 = pid_n.to(tl.int64) * BLOCK_N
    col0 = pid_v.to(tl.int64) * BLOCK_V
    rows = row0 + tl.arange(0, BLOCK_N)
    offs_v = tl.arange(0, BLOCK_V)
    return row0, col0, rows, rows < N, offs_v, offs_v < n_cols - col0


@triton.jit
def grouped_tile(pid, N, n_cols, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP_M: tl.constexpr):
    """chunk_tile of a GEMM-like program (dz, chunk logits) in grouped order (kernels/schedule.py)."""
    pid_n, pid_v = grouped(pid, tl.cdiv(N, BLOCK_N), tl.cdiv(n_cols, BLOCK_V), GROUP_M)
    return chunk_tile(pid_n, pid_v, N, n_cols, BLOCK_N, BLOCK_V)


@triton.jit
def tanh(x):
    # tanh(x) = sign(x) * (1 - e^{-2|x|}) / (1 + e^{-2|x|}); never overflows.
    t = tl.exp(-2.0 * tl.abs(x))
    r = (1.0 - t) / (1.0 + t)
    return tl.where(x >= 0, r, -r)


@triton.jit
def logit_tile(
    h_blk, stride_hn, stride_hd,
    w_blk, stride_wv, stride_wd,
    b_blk, softcap, scale,
    row_mask, col_mask, D,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SCALE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """fp32 tile z[BLOCK_N, BLOCK_V]. h_blk, w_blk, b_blk already point at the tile's first
    row / vocabulary column (int64 scalar offsets); in-tile offsets stay int32."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_v = tl.arange(0, BLOCK_V)
    offs_d = tl.arange(0, BLOCK_D)
    h_ptrs = h_blk + offs_n[:, None] * stride_hn + offs_d[None, :] * stride_hd
    w_ptrs = w_blk + offs_d[:, None] * stride_wd + offs_v[None, :] * stride_wv   # w read as [D, V]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    # 1. reduce over the hidden dimension in BLOCK_D slices
    for d0 in range(0, D, BLOCK_D):
        d_mask = (d0 + offs_d) < D
        h = tl.load(h_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=d_mask[:, None] & col_mask[None, :], other=0.0)
        if DOT_FP32:
            # the Triton interpreter's bf16 dot is wrong; upcast there (never on a GPU)
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        if h.dtype == tl.float32:
            # three TF32 passes: fp32-level accuracy on tensor cores
            acc = tl.dot(h, w, acc, input_precision="tf32x3")
        else:
            acc = tl.dot(h, w, acc)
        h_ptrs += BLOCK_D * stride_hd
        w_ptrs += BLOCK_D * stride_wd
    # 2. bias, soft-capping and the logit scale in fp32
    if HAS_BIAS:
        acc += tl.load(b_blk + offs_v, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = softcap * tanh(acc / softcap)
    if HAS_SCALE:
        acc = acc * scale
    return acc


@triton.jit
def head_chain(dz, z, softcap, scale, HAS_SOFTCAP: tl.constexpr, HAS_SCALE: tl.constexpr):
    """Gradient w.r.t. the linear logits h.w + b from dz, the gradient w.r.t. the transformed
    logits z: times scale and the cap's derivative 1 - (z / (scale softcap))^2."""
    if HAS_SOFTCAP:
        if HAS_SCALE:
            c = z / (scale * softcap)
        else:
            c = z / softcap
        dz = dz * (1.0 - c * c)
    if HAS_SCALE:
        dz = dz * scale
    return dz


@triton.jit
def stats_init(BLOCK_N: tl.constexpr):
    """The statistics' accumulators (zsum, pz, amax, aidx, q) for stats_step."""
    return (tl.zeros((BLOCK_N,), tl.float32), tl.zeros((BLOCK_N,), tl.float32),
            tl.full((BLOCK_N,), float("-inf"), tl.float32), tl.zeros((BLOCK_N,), tl.int32),
            tl.zeros((BLOCK_N,), tl.float32))


@triton.jit
def stats_store(out, plane, arg_out, row_mask, zsum, pz, amax, aidx, q):
    """Stores the statistics into planes 3, 4, 5, 6 of the [plane, split, row] partials (the
    layout both forward kernels share) and the argmax into arg_out."""
    tl.store(out + 3 * plane, zsum, mask=row_mask)
    tl.store(out + 4 * plane, pz, mask=row_mask)
    tl.store(out + 5 * plane, amax, mask=row_mask)
    tl.store(out + 6 * plane, q, mask=row_mask)
    tl.store(arg_out, aidx, mask=row_mask)


@triton.jit
def stats_step(zsum, pz, amax, aidx, q, z, p, col_mask, m, m_new, l, alpha, tile_max, v0):
    """One vocabulary tile of the online statistics of a logit tile z (-inf past the split)
    with p = exp(z - m_new): the sum of logits, S = sum exp(z - m)(z - m) kept relative to the
    running max (rescaled as S' = alpha (S + (m - m_new) l) with l the running sum before this
    tile, so the entropy log l - S / l does not cancel against lse in fp32), the first argmax,
    and q = sum exp(2 (z - m)) (log sum_v p_v^2 = log q - 2 log l; rescaled by alpha^2).
    Returns the updated (zsum, pz, amax, aidx, q)."""
    zsum += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
    zm = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)   # p is 0 there; no 0 * -inf
    pz = alpha * (pz + tl.where(l > 0, m - m_new, 0.0) * l) + tl.sum(p * zm, axis=1)
    q = q * alpha * alpha + tl.sum(p * p, axis=1)
    tile_arg = (tl.argmax(z, axis=1) + v0).to(tl.int32)
    better = tile_max > amax
    return zsum, pz, tl.where(better, tile_max, amax), tl.where(better, tile_arg, aidx), q


@triton.jit
def stats_grad(p, logp, rows, row_mask, gst_ptr, st_ptr):
    """The gradient w.r.t. the logits of sum_i <g_i, stats_i> for the statistics [n, 4] =
    (sum_v z, entropy H, argmax hit, log Q = log sum_v p^2), given p = softmax(z) and logp:
        d sum_v z / dz = 1,   dH / dz = -p (log p + H),   d log Q / dz = 2 p (p / Q - 1),
    the hit being piecewise constant (gradient 0). gst_ptr: the upstream gradient [n, 4] and
    st_ptr the statistics [n, 4], fp32, rows contiguous."""
    g_sum = tl.load(gst_ptr + rows * 4, mask=row_mask, other=0.0)
    g_ent = tl.load(gst_ptr + rows * 4 + 1, mask=row_mask, other=0.0)
    g_q = tl.load(gst_ptr + rows * 4 + 3, mask=row_mask, other=0.0)
    ent = tl.load(st_ptr + rows * 4 + 1, mask=row_mask, other=0.0)
    inv_q = tl.exp(-tl.load(st_ptr + rows * 4 + 3, mask=row_mask, other=0.0))
    return (g_sum[:, None] - g_ent[:, None] * p * (logp + ent[:, None])
            + 2.0 * g_q[:, None] * p * (p * inv_q[:, None] - 1.0))
