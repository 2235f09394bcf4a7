"""Building blocks shared by the kernels: one logit tile of a linear LM head.

    z[r, c] = sum_d h[r, d] * w[c, d]  (+ b[c])          fp32 accumulation
    z       = softcap * tanh(z / softcap)                 when HAS_SOFTCAP (Gemma-2 style)
"""
import triton
import triton.language as tl


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
    b_blk, softcap,
    row_mask, col_mask, D,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr,
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
    # 2. bias and soft-capping in fp32
    if HAS_BIAS:
        acc += tl.load(b_blk + offs_v, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = softcap * tanh(acc / softcap)
    return acc


@triton.jit
def stats_init(BLOCK_N: tl.constexpr):
    """The metric statistics' accumulators (zsum, pz, amax, aidx) for stats_step."""
    return (tl.zeros((BLOCK_N,), tl.float32), tl.zeros((BLOCK_N,), tl.float32),
            tl.full((BLOCK_N,), float("-inf"), tl.float32), tl.zeros((BLOCK_N,), tl.int32))


@triton.jit
def stats_store(out, plane, arg_out, row_mask, zsum, pz, amax, aidx):
    """Stores the statistics into planes 3, 4, 5 of the [plane, split, row] partials (the layout
    both forward kernels share) and the argmax into arg_out."""
    tl.store(out + 3 * plane, zsum, mask=row_mask)
    tl.store(out + 4 * plane, pz, mask=row_mask)
    tl.store(out + 5 * plane, amax, mask=row_mask)
    tl.store(arg_out, aidx, mask=row_mask)


@triton.jit
def stats_step(zsum, pz, amax, aidx, z, p, col_mask, m, m_new, l, alpha, tile_max, v0):
    """One vocabulary tile of the online metric statistics of a logit tile z (-inf past the
    split) with p = exp(z - m_new): the sum of logits, S = sum exp(z - m)(z - m) kept relative
    to the running max (rescaled as S' = alpha (S + (m - m_new) l) with l the running sum before
    this tile, so the entropy log l - S / l does not cancel against lse in fp32) and the first
    argmax. Returns the updated (zsum, pz, amax, aidx)."""
    zsum += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
    zm = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)   # p is 0 there; no 0 * -inf
    pz = alpha * (pz + tl.where(l > 0, m - m_new, 0.0) * l) + tl.sum(p * zm, axis=1)
    tile_arg = (tl.argmax(z, axis=1) + v0).to(tl.int32)
    better = tile_max > amax
    return zsum, pz, tl.where(better, tile_max, amax), tl.where(better, tile_arg, aidx)
