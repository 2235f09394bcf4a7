"""Accumulating matmul with an fp32 accumulator in memory:   C[M, N] += A[M, K] @ B[K, N],
or with ROW_SCALE  C = s[:, None] * C + A @ B  (s [M] fp32).

Used for dH = sum over vocabulary chunks of dz_chunk @ W_chunk, so that the hidden-state
gradient of a 16-bit head is summed in fp32 across chunks and rounded once at the end; with
ROW_SCALE for the frozen-head forward's softmax-weighted sum of W rows, rescaled as the running
max grows (kernels/frozen.py).
"""
import triton
import triton.language as tl

from .schedule import grouped


@triton.jit
def mm_acc_kernel(
    a_ptr, b_ptr, c_ptr, s_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr, ROW_SCALE: tl.constexpr,
):
    # 1. grouped program order: GROUP_M row blocks share the same B columns in L2
    pid_m, pid_n = grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    pid_m = pid_m.to(tl.int64)
    pid_n = pid_n.to(tl.int64)

    m0 = pid_m * BLOCK_M                        # int64 scalars; in-tile offsets are int32
    n0 = pid_n * BLOCK_N
    om = tl.arange(0, BLOCK_M)
    on = tl.arange(0, BLOCK_N)
    ok = tl.arange(0, BLOCK_K)
    m_mask = om < M - m0
    n_mask = on < N - n0
    a_ptrs = a_ptr + m0 * stride_am + om[:, None] * stride_am + ok[None, :] * stride_ak
    b_ptrs = b_ptr + n0 * stride_bn + ok[:, None] * stride_bk + on[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # 2. fp32 accumulation over K
    for k0 in range(0, K, BLOCK_K):
        k_mask = ok < K - k0
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if a.dtype == tl.float32:
            acc = tl.dot(a, b, acc, input_precision="tf32x3")
        else:
            acc = tl.dot(a, b, acc)
    # 3. read-modify-write of the fp32 accumulator (each tile is owned by one program)
    c_ptrs = c_ptr + m0 * stride_cm + n0 * stride_cn + om[:, None] * stride_cm + on[None, :] * stride_cn
    c_mask = m_mask[:, None] & n_mask[None, :]
    c = tl.load(c_ptrs, mask=c_mask, other=0.0)
    if ROW_SCALE:
        c = c * tl.load(s_ptr + m0 + om, mask=m_mask, other=0.0)[:, None]
    tl.store(c_ptrs, c + acc, mask=c_mask)
