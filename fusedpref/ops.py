"""Host wrappers of the Triton kernels: check -> allocate -> grid -> launch.

All functions take the *compacted* rows (ignored targets already removed): h [Nv, D],
targets y [Nv]. Tensors may live on CUDA, or on the CPU when TRITON_INTERPRET=1.
"""
from __future__ import annotations

import math

import torch
import triton

from . import config, schedule
from ._chunks import vocab_chunk_cols, vocab_chunks
from ._partials import ONE_HEAD, finish_kl, finish_logprob, merge
from ._partials import PLANES as KL_PLANES
from .chunked import frozen_direction
from .kernels import (chunk_kl_probs_kernel, chunk_logits_kernel, chunk_probs_kernel, jsd_fwd_kernel, kl_dz_kernel, kl_fwd_kernel,
                      logprob_dz_kernel, logprob_fwd_kernel, mm_acc_kernel)
from .kernels.frozen import FIELDS as FROZEN_FIELDS
from .kernels.frozen import KL_FIELDS as FROZEN_KL_FIELDS


def _xf(softcap, scale, ref=False):
    """Kernel arguments of one head's logit transform (cap, then scale; None = off)."""
    pre = "ref_" if ref else ""
    flag = "HAS_REF_" if ref else "HAS_"
    return {f"{pre}softcap": 1.0 if softcap is None else softcap, f"{pre}scale": 1.0 if scale is None else scale,
            f"{flag}SOFTCAP": softcap is not None, f"{flag}SCALE": scale is not None}


def _dot_fp32(dtype: torch.dtype) -> bool:
    # The Triton interpreter computes bf16 tl.dot wrongly; upcast the operands there only.
    return config.interpreting() and dtype == torch.bfloat16


def _tiles(kernel: str, h: torch.Tensor, shape_key, run):
    if config.autotune_enabled() and h.is_cuda:
        return config.autotuned((kernel, h.dtype, h.device.index) + shape_key, run)
    return config.tiles(kernel, h.device, h.dtype)


def _splits(n, vocab, d, elem, tiles, device):
    """(row blocks, vocabulary per split, number of splits) of the split-major forward grid
    (fusedpref/schedule.py: the fewest splits whose resident H blocks fit in half the L2)."""
    splits = schedule.forward_splits(n, vocab, d, elem, tiles.BLOCK_N, tiles.BLOCK_V, config.num_sms(device),
                                     config.l2_bytes(device))
    return schedule.split_layout(n, vocab, tiles.BLOCK_N, tiles.BLOCK_V, splits)


def logprob_partials(h, w, b, y, softcap, with_stats: bool, scale=None):
    """The forward's per-row partials merged over its splits (fusedpref/_partials.py): ([3 or 7, Nv],
    argmax ids [Nv] or None); logits softcap(h w^T + b) * scale. Targets y outside [0, V) have no
    target logit (zy = 0): a vocabulary shard's rows whose target another rank holds."""
    n, d = h.shape
    vocab = w.shape[0]
    nf = ONE_HEAD if with_stats else 3

    def run(tiles: config.Tiles):
        n_blocks, v_per_split, splits = _splits(n, vocab, d, h.element_size(), tiles, h.device)
        part = config.empty((nf, splits, n), torch.float32, h.device)
        arg = config.empty((splits, n), torch.int32, h.device) if with_stats else None
        logprob_fwd_kernel[(n_blocks * splits,)](
            h, w, b if b is not None else h, y, part, arg if arg is not None else part,
            n, vocab, d, v_per_split, splits,
            h.stride(0), h.stride(1), w.stride(0), w.stride(1),
            HAS_BIAS=b is not None, STATS=with_stats, **_xf(softcap, scale),
            DOT_FP32=_dot_fp32(h.dtype), **tiles.constexprs(), **tiles.launch(),
        )
        return part, arg

    tiles = _tiles("fwd_stats" if with_stats else "fwd", h, (triton.next_power_of_2(n), vocab, d, with_stats), run)
    return merge(*run(tiles))


def logprob_forward(h, w, b, y, softcap, with_stats: bool, scale=None):
    """logp [Nv], lse [Nv] (fp32) and, with_stats, [Nv, 4] = (sum_v z, entropy, argmax hit,
    log sum_v p^2); logits softcap(h w^T + b) * scale."""
    return finish_logprob(*logprob_partials(h, w, b, y, softcap, with_stats, scale), y)


def _mm_acc(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, row_scale: torch.Tensor | None = None):
    """c (fp32) += a @ b; with row_scale [M]: c = row_scale[:, None] * c + a @ b."""
    tiles = config.tiles("mm", a.device, a.dtype)
    m, k = a.shape
    n = b.shape[1]
    grid = (triton.cdiv(m, tiles.BLOCK_N) * triton.cdiv(n, tiles.BLOCK_V),)
    mm_acc_kernel[grid](
        a, b, c, row_scale if row_scale is not None else c, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        BLOCK_M=tiles.BLOCK_N, BLOCK_N=tiles.BLOCK_V, BLOCK_K=tiles.BLOCK_D,
        GROUP_M=schedule.GROUP_M, DOT_FP32=_dot_fp32(a.dtype), ROW_SCALE=row_scale is not None, **tiles.launch(),
    )


def chunked_head_backward(h, w, need_h, need_w, need_b, fill_dz, dh_dtype=None):
    """Drives a backward through vocabulary chunks of the logit gradient dz.

    fill_dz(dz_view, v0, v1, need_b) writes dz[:, v0:v1] (operand dtype) into dz_view
    [Nv, v1 - v0] and, with need_b, returns per-row-block fp32 column sums [blocks, v1 - v0] of the
    unrounded dz. Per chunk: dW[v0:v1] = dz^T @ h (one rounding, cuBLAS), db[v0:v1] = the sum of
    those partials, dH += dz @ W[v0:v1] into an fp32 accumulator (mm_acc kernel), rounded once
    (to dh_dtype if given, else h's dtype).
    """
    n, d = h.shape
    vocab = w.shape[0]
    tiles = config.tiles("dz", h.device, h.dtype)
    cols = vocab_chunk_cols(n, vocab, h.element_size(), tiles.BLOCK_V, default_mb=schedule.DEFAULT_CHUNK_MB,
                            max_cols=schedule.DEFAULT_CHUNK_COLS)
    dz = config.empty((n, cols), h.dtype, h.device)
    dh = torch.zeros((n, d), dtype=torch.float32, device=h.device) if need_h else None
    dw = config.empty((vocab, d), w.dtype, w.device) if need_w else None
    db = config.empty((vocab,), torch.float32, w.device) if need_b else None
    for v0, v1 in vocab_chunks(vocab, cols):
        dzc = dz[:, : v1 - v0]
        db_part = fill_dz(dzc, v0, v1, need_b)
        if need_w:
            torch.mm(dzc.t(), h, out=dw[v0:v1])
        if need_b:
            torch.sum(db_part, dim=0, out=db[v0:v1])
        if need_h:
            _mm_acc(dzc, w[v0:v1], dh)
    return (dh.to(dh_dtype or h.dtype) if need_h else None), dw, db


def _chunk_logits(h, w, b, z_buf, v0, v1, softcap, scale):
    """z_buf[:, :v1 - v0] = the transformed logits of columns v0:v1 (fp32); returns their row max."""
    n, d = h.shape
    tiles = config.tiles("logits", h.device, h.dtype)
    n_tiles = triton.cdiv(v1 - v0, tiles.BLOCK_V)
    tmax = config.empty((n_tiles, n), torch.float32, h.device)
    chunk_logits_kernel[(triton.cdiv(n, tiles.BLOCK_N) * n_tiles,)](
        h, w, b if b is not None else h, z_buf, tmax, n, w.shape[0], d, v0, v1 - v0,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1), z_buf.stride(0),
        HAS_BIAS=b is not None, **_xf(softcap, scale), DOT_FP32=_dot_fp32(h.dtype), GROUP_M=schedule.GROUP_M,
        **tiles.constexprs(), **tiles.launch(),
    )
    return tmax.amax(0)


def _fold_tiles(part, arg, c, tile_part, tile_arg, fields, sums_of):
    """Chunk c's partials (planes of KL_PLANES; 0..6 are logprob_fwd_kernel's) from its tiles',
    which share the chunk's reference maxes: the named sums of (plane, field) pairs and, with
    tile_arg, the statistics (sums, and the max and argmax of the first tile holding the max)."""
    sums = tile_part.sum(1)
    for plane, field in sums_of:
        part[KL_PLANES[plane], c] = sums[fields[field]]
    if tile_arg is not None:
        for plane in ("zsum", "pz", "q"):
            part[KL_PLANES[plane], c] = sums[fields[plane]]
        amax = tile_part[fields["amax"]]
        best = amax.argmax(0, keepdim=True)
        part[KL_PLANES["amax"], c] = amax.gather(0, best).squeeze(0)
        arg[c] = tile_arg.gather(0, best).squeeze(0)


def logprob_partials_frozen(h, w, b, y, softcap, with_stats: bool, scale=None):
    """The frozen-head sweep (kernels/frozen.py): the merged partials and argmax ids as
    logprob_partials', and acc [Nv, D] fp32 = sum_v exp(z_v - m) k(z_v) W[v] relative to the merged
    max m (2 N D V FLOPs of logits + 2 N D V of P @ W)."""
    n, d = h.shape
    vocab = w.shape[0]
    tiles = config.tiles("dz", h.device, h.dtype)
    cols = vocab_chunk_cols(n, vocab, 4, tiles.BLOCK_V, default_mb=schedule.DEFAULT_CHUNK_MB,
                            max_cols=schedule.DEFAULT_CHUNK_COLS)
    chunks = list(vocab_chunks(vocab, cols))
    f = torch.float32
    z_buf = config.empty((n, cols), f, h.device)
    p_buf = config.empty((n, cols), h.dtype, h.device)
    acc = torch.zeros((n, d), dtype=f, device=h.device)
    m_run = torch.full((n,), float("-inf"), dtype=f, device=h.device)
    # per chunk, partials relative to its running max: planes as logprob_fwd_kernel's
    part = config.empty((ONE_HEAD if with_stats else 3, len(chunks), n), f, h.device)
    arg = config.empty((len(chunks), n), torch.int32, h.device) if with_stats else None
    pt = config.tiles("probs", h.device, h.dtype)
    n_blocks = triton.cdiv(n, pt.BLOCK_N)
    xf = _xf(softcap, scale)
    for c, (v0, v1) in enumerate(chunks):
        n_tiles = triton.cdiv(v1 - v0, pt.BLOCK_V)
        m_new = torch.maximum(m_run, _chunk_logits(h, w, b, z_buf, v0, v1, softcap, scale))
        tile_part = config.empty((len(FROZEN_FIELDS), n_tiles, n), f, h.device)
        tile_arg = config.empty((n_tiles, n), torch.int32, h.device) if with_stats else None
        chunk_probs_kernel[(n_blocks * n_tiles,)](
            z_buf, y, m_new, p_buf, tile_part, tile_arg if with_stats else tile_part,
            n, v0, v1 - v0, n_tiles, z_buf.stride(0), p_buf.stride(0),
            softcap=xf["softcap"], scale=xf["scale"], HAS_SOFTCAP=xf["HAS_SOFTCAP"], HAS_SCALE=xf["HAS_SCALE"],
            STATS=with_stats, BLOCK_N=pt.BLOCK_N, BLOCK_V=pt.BLOCK_V, num_warps=pt.num_warps,
        )
        part[KL_PLANES["m_z"], c] = m_new
        _fold_tiles(part, arg, c, tile_part, tile_arg, FROZEN_FIELDS, (("l_z", "l"), ("zy", "zy")))
        alpha = torch.exp(m_run - m_new)                        # 0 before the first chunk
        _mm_acc(p_buf[:, : v1 - v0], w[v0:v1], acc, row_scale=alpha)
        m_run = m_new
    return (*merge(part, arg), acc)


def logprob_forward_frozen(h, w, b, y, softcap, with_stats: bool, scale=None):
    """The frozen-head forward: logp, lse [Nv], stats [Nv, 4] or None as logprob_forward, and the
    direction d [Nv, D] fp32 with dlogp_i / dh_i = d_i, from one sweep over the vocabulary."""
    merged, best, acc = logprob_partials_frozen(h, w, b, y, softcap, with_stats, scale)
    logp, lse, stats = finish_logprob(merged, best, y)
    return logp, lse, stats, frozen_direction(w, y, merged[KL_PLANES["zy"]], acc, merged[KL_PLANES["l_z"]],
                                              softcap, scale)


def _stats_grad_args(g_stats, stats, fallback):
    """(gst, st) pointers for STATS_GRAD: the statistics' upstream gradient and values [n, 4]."""
    if g_stats is None:
        return fallback, fallback
    return g_stats.float().contiguous(), stats.float().contiguous()


def logprob_backward(h, w, b, y, lse, g, softcap, need_h, need_w, need_b, scale=None, g_stats=None, stats=None,
                     dh_dtype=None):
    """Gradients of sum_i g_i * logp_i (+ sum_i <g_stats_i, stats_i>, stats as logprob_forward's)
    w.r.t. h [Nv, D], w [V, D], b [V] (None where not needed)."""
    n, d = h.shape
    vocab = w.shape[0]
    g = g.float().contiguous()
    gst, st = _stats_grad_args(g_stats, stats, g)

    def fill(dzc, v0, v1, need_db):
        def run(tiles):
            n_blocks = triton.cdiv(n, tiles.BLOCK_N)
            db_part = config.empty((n_blocks, v1 - v0), torch.float32, h.device) if need_db else None
            logprob_dz_kernel[(n_blocks * triton.cdiv(v1 - v0, tiles.BLOCK_V),)](
                h, w, b if b is not None else h, y, lse, g, gst, st, dzc, db_part if need_db else lse,
                n, vocab, d, v0, v1 - v0,
                h.stride(0), h.stride(1), w.stride(0), w.stride(1), dzc.stride(0),
                db_part.stride(0) if need_db else 0,
                HAS_BIAS=b is not None, **_xf(softcap, scale), STATS_GRAD=g_stats is not None, HAS_DB=need_db,
                DOT_FP32=_dot_fp32(h.dtype), GROUP_M=schedule.GROUP_M, **tiles.constexprs(), **tiles.launch(),
            )
            return db_part
        kind = "dz" if g_stats is None else "dz_stats"
        return run(_tiles(kind, h, (triton.next_power_of_2(n), v1 - v0, d), run))

    return chunked_head_backward(h, w, need_h, need_w, need_b, fill, dh_dtype)


def _jsd_logs(beta):
    return math.log1p(-beta), math.log(beta)


def kl_partials(h, w, b, rh, rw, rb, softcap, y=None, with_stats=False, *, scale=None, ref_softcap=None,
                ref_scale=None, div=0):
    """The two-head forward's per-row partials merged over its splits: ([11, Nv] planes of
    fusedpref/_partials.py, argmax ids [Nv] or None); the a plane is divergence div's (none for 2)."""
    n, d = h.shape
    vocab = w.shape[0]
    logp_on = y is not None
    if with_stats and not logp_on:
        raise ValueError("with_stats needs the targets y")
    tiles = config.tiles("kl_fwd_stats" if with_stats else "kl_fwd", h.device, h.dtype)
    n_blocks, v_per_split, splits = _splits(n, vocab, d, max(h.element_size(), rh.element_size()), tiles, h.device)
    part = config.empty((len(KL_PLANES), splits, n), torch.float32, h.device)
    arg = config.empty((splits, n), torch.int32, h.device) if with_stats else None
    heads, strides, flags = _two_heads(h, w, b, rh, rw, rb, softcap, scale, ref_softcap, ref_scale)
    kl_fwd_kernel[(n_blocks * splits,)](
        *heads, y if logp_on else part, part, arg if arg is not None else part,
        n, vocab, d, rh.shape[1], v_per_split, splits, *strides,
        KL_DIR=div, LOGP=logp_on, STATS=with_stats, **flags, **tiles.constexprs(), **tiles.launch(),
    )
    if not logp_on:
        part[KL_PLANES["zy"]], part[KL_PLANES["ry"]] = 0.0, 0.0
    return merge(part, arg, div)


def _two_heads(h, w, b, rh, rw, rb, softcap, scale, ref_softcap, ref_scale):
    """(pointers, strides, flags) of a two-head kernel launch."""
    heads = (h, w, b if b is not None else h, rh, rw, rb if rb is not None else rh)
    strides = (h.stride(0), h.stride(1), w.stride(0), w.stride(1), rh.stride(0), rh.stride(1), rw.stride(0),
               rw.stride(1))
    flags = dict(HAS_BIAS=b is not None, HAS_REF_BIAS=rb is not None, **_xf(softcap, scale),
                 **_xf(ref_softcap, ref_scale, ref=True), DOT_FP32=_dot_fp32(h.dtype),
                 REF_DOT_FP32=_dot_fp32(rh.dtype))
    return heads, strides, flags


def kl_forward(h, w, b, rh, rw, rb, softcap, y=None, with_stats=False, *, scale=None, ref_softcap=None,
               ref_scale=None, div=0, beta=0.5):
    """Per-row divergence [Nv] between the policy head (h, w, b, softcap, scale) and the
    reference head (rh, rw, rb, ref_softcap, ref_scale): div 0 KL(p_ref || p), 1 KL(p || p_ref),
    2 the generalised JSD with mixture (1 - beta) p + beta p_ref; with targets y also both heads'
    log-probs [Nv], and with_stats the policy's stats [Nv, 4] (as logprob_forward) — all from one
    pass over both heads (the JSD adds a second). Returns (div, lse, rlse, logp, ref_logp, stats,
    aux), None where not asked for; aux is what the backward needs besides lse, rlse (div 1: the
    KL, div 2: KL(p || m)), else None."""
    merged, arg = kl_partials(h, w, b, rh, rw, rb, softcap, y, with_stats, scale=scale, ref_softcap=ref_softcap,
                              ref_scale=ref_scale, div=div)
    out = finish_kl(merged, arg, y, div)
    if div == 2:
        out["div"], out["aux"] = jsd_sums(h, w, b, rh, rw, rb, out["lse"], out["rlse"], softcap, scale=scale,
                                          ref_softcap=ref_softcap, ref_scale=ref_scale, beta=beta)
    return tuple(out[k] for k in ("div", "lse", "rlse", "logp", "ref_logp", "stats", "aux"))


def kl_partials_frozen(h, w, b, rh, rw, rb, softcap, y=None, with_stats=False, *, scale=None, ref_softcap=None,
                       ref_scale=None):
    """KL(p_ref || p) with a frozen policy head, one sweep by vocabulary chunks
    (kernels/frozen.py): the merged partials and argmax ids as kl_partials' (div 0), and
    acc_p, acc_q [Nv, D] fp32 = sum_v exp(z_v - m_z) k(z_v) W[v] and sum_v exp(r_v - m_r) k(z_v) W[v]
    relative to the merged maxes. 4 N D V FLOPs of logits (both heads) + 4 N D V of P @ W and Q @ W."""
    n, d = h.shape
    vocab = w.shape[0]
    logp_on = y is not None
    if with_stats and not logp_on:
        raise ValueError("with_stats needs the targets y")
    tiles = config.tiles("dz", h.device, h.dtype)
    cols = vocab_chunk_cols(n, vocab, 8, tiles.BLOCK_V, default_mb=schedule.DEFAULT_CHUNK_MB,
                            max_cols=schedule.DEFAULT_CHUNK_COLS)
    chunks = list(vocab_chunks(vocab, cols))
    f = torch.float32
    yk = y if logp_on else torch.full((n,), -1, dtype=torch.long, device=h.device)
    z_buf, r_buf = config.empty((n, cols), f, h.device), config.empty((n, cols), f, h.device)
    p_buf, q_buf = config.empty((n, cols), h.dtype, h.device), config.empty((n, cols), h.dtype, h.device)
    acc_p = torch.zeros((n, d), dtype=f, device=h.device)
    acc_q = torch.zeros((n, d), dtype=f, device=h.device)
    mz_run = torch.full((n,), float("-inf"), dtype=f, device=h.device)
    mr_run = mz_run.clone()
    part = torch.zeros((len(KL_PLANES), len(chunks), n), dtype=f, device=h.device)
    arg = config.empty((len(chunks), n), torch.int32, h.device) if with_stats else None
    pt = config.tiles("probs", h.device, h.dtype)
    n_blocks = triton.cdiv(n, pt.BLOCK_N)
    xf = _xf(softcap, scale)
    K = FROZEN_KL_FIELDS
    for c, (v0, v1) in enumerate(chunks):
        n_tiles = triton.cdiv(v1 - v0, pt.BLOCK_V)
        maxes = [_chunk_logits(hh, ww, bb, buf, v0, v1, sc, scl)
                 for hh, ww, bb, buf, sc, scl in ((h, w, b, z_buf, softcap, scale),
                                                  (rh, rw, rb, r_buf, ref_softcap, ref_scale))]
        mz_new, mr_new = torch.maximum(mz_run, maxes[0]), torch.maximum(mr_run, maxes[1])
        tile_part = config.empty((len(K), n_tiles, n), f, h.device)
        tile_arg = config.empty((n_tiles, n), torch.int32, h.device) if with_stats else None
        chunk_kl_probs_kernel[(n_blocks * n_tiles,)](
            z_buf, r_buf, yk, mz_new, mr_new, p_buf, q_buf, tile_part, tile_arg if with_stats else tile_part,
            n, v0, v1 - v0, n_tiles, z_buf.stride(0), p_buf.stride(0),
            softcap=xf["softcap"], scale=xf["scale"], HAS_SOFTCAP=xf["HAS_SOFTCAP"], HAS_SCALE=xf["HAS_SCALE"],
            STATS=with_stats, BLOCK_N=pt.BLOCK_N, BLOCK_V=pt.BLOCK_V, num_warps=pt.num_warps,
        )
        part[KL_PLANES["m_z"], c], part[KL_PLANES["m_r"], c] = mz_new, mr_new
        _fold_tiles(part, arg, c, tile_part, tile_arg, K,
                    (("l_z", "l"), ("zy", "zy"), ("l_r", "l_r"), ("ry", "ry"), ("a", "a")))
        _mm_acc(p_buf[:, : v1 - v0], w[v0:v1], acc_p, row_scale=torch.exp(mz_run - mz_new))
        _mm_acc(q_buf[:, : v1 - v0], w[v0:v1], acc_q, row_scale=torch.exp(mr_run - mr_new))
        mz_run, mr_run = mz_new, mr_new
    return (*merge(part, arg, 0), acc_p, acc_q)


def kl_forward_frozen(h, w, b, rh, rw, rb, softcap, y=None, with_stats=False, *, scale=None, ref_softcap=None,
                      ref_scale=None):
    """KL(p_ref || p) with a frozen policy head, one sweep: as kl_forward (div 0) plus the
    directions of dH,
        d_kl = E_p[k W] - E_ref[k W]           (dKL/dh)
        d_lp = k(z_y) W[y] - E_p[k W]          (dlogp/dh; with targets y, else None)
    fp32 [Nv, D]."""
    merged, arg, acc_p, acc_q = kl_partials_frozen(h, w, b, rh, rw, rb, softcap, y, with_stats, scale=scale,
                                                   ref_softcap=ref_softcap, ref_scale=ref_scale)
    out = finish_kl(merged, arg, y, 0)
    logp_on = y is not None
    ep = acc_p / out["ztotal"][:, None]
    d_kl = ep - acc_q / out["rtotal"][:, None]
    d_lp = frozen_direction(w, y, merged[KL_PLANES["zy"]], acc_p, out["ztotal"], softcap, scale) if logp_on \
        else None
    return out["div"], out["lse"], out["rlse"], out["logp"], out["ref_logp"], out["stats"], d_lp, d_kl


def jsd_sums(h, w, b, rh, rw, rb, lse, rlse, softcap, *, scale=None, ref_softcap=None, ref_scale=None, beta=0.5):
    """The generalised JSD's second pass given both heads' lse [Nv]: (jsd, KL(p || m)) [Nv], sums
    over the vocabulary of w (a shard's part of the sums, given the global lse)."""
    n, d = h.shape
    heads, strides, flags = _two_heads(h, w, b, rh, rw, rb, softcap, scale, ref_softcap, ref_scale)
    tiles = config.tiles("kl_fwd", h.device, h.dtype)
    n_blocks, v_per_split, splits = _splits(n, w.shape[0], d, max(h.element_size(), rh.element_size()), tiles,
                                            h.device)
    part = config.empty((2, splits, n), torch.float32, h.device)
    log_1mb, log_b = _jsd_logs(beta)
    jsd_fwd_kernel[(n_blocks * splits,)](
        *heads, lse.float().contiguous(), rlse.float().contiguous(), part, n, w.shape[0], d, rh.shape[1],
        v_per_split, splits, *strides, beta=beta, log_1mb=log_1mb, log_b=log_b, **flags, **tiles.constexprs(),
        **tiles.launch(),
    )
    return part[0].sum(0), part[1].sum(0)


def kl_backward(h, w, b, rh, rw, rb, lse, rlse, g, softcap, need_h, need_w, need_b, y=None, g_lp=None, *,
                scale=None, ref_softcap=None, ref_scale=None, div=0, beta=0.5, aux=None, g_stats=None,
                stats=None, dh_dtype=None):
    """Gradients of sum_i g_i * div_i (+ sum_i g_lp_i * logp_i, given targets y; + the stats'
    upstream gradient) w.r.t. the policy's h, w, b: one recompute of both heads for all terms."""
    n, d = h.shape
    vocab = w.shape[0]
    g = g.float().contiguous()
    logp_on = g_lp is not None
    if logp_on:
        g_lp = g_lp.float().contiguous()
    aux = g if aux is None else aux.float().contiguous()
    gst, st = _stats_grad_args(g_stats, stats, g)
    tiles = config.tiles("kl_dz", h.device, h.dtype)
    log_1mb, log_b = _jsd_logs(beta) if div == 2 else (0.0, 0.0)

    def fill(dzc, v0, v1, need_db):
        n_blocks = triton.cdiv(n, tiles.BLOCK_N)
        db_part = config.empty((n_blocks, v1 - v0), torch.float32, h.device) if need_db else None
        kl_dz_kernel[(n_blocks * triton.cdiv(v1 - v0, tiles.BLOCK_V),)](
            h, w, b if b is not None else h, rh, rw, rb if rb is not None else rh, lse, rlse, g, aux,
            y if logp_on else g, g_lp if logp_on else g, gst, st, dzc, db_part if need_db else g,
            n, vocab, d, rh.shape[1], v0, v1 - v0,
            h.stride(0), h.stride(1), w.stride(0), w.stride(1),
            rh.stride(0), rh.stride(1), rw.stride(0), rw.stride(1), dzc.stride(0),
            db_part.stride(0) if need_db else 0, beta=float(beta), log_1mb=log_1mb, log_b=log_b,
            HAS_BIAS=b is not None, HAS_REF_BIAS=rb is not None, **_xf(softcap, scale),
            **_xf(ref_softcap, ref_scale, ref=True), DIV=div, LOGP=logp_on, STATS_GRAD=g_stats is not None,
            HAS_DB=need_db, DOT_FP32=_dot_fp32(h.dtype), REF_DOT_FP32=_dot_fp32(rh.dtype),
            GROUP_M=schedule.GROUP_M, **tiles.constexprs(), **tiles.launch(),
        )
        return db_part

    return chunked_head_backward(h, w, need_h, need_w, need_b, fill, dh_dtype)
