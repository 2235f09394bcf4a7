"""Host wrappers of the Triton kernels: check -> allocate -> grid -> launch.

The same verbs as the torch backend (fusedpref/chunked.py): logprob_partials,
logprob_partials_frozen, kl_partials, kl_partials_frozen (-> fusedpref._partials.Partials,
merged over the kernels' vocabulary splits), jsd_sums, backward. All take *compacted* rows
(ignored targets already removed) as `Head` bundles (fusedpref/_spec.py). Tensors may live on
CUDA, or on the CPU when TRITON_INTERPRET=1. The maths shared with the torch backend lives in
fusedpref/_partials.py; this module never imports the torch backend.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton

from . import config, schedule
from ._chunks import vocab_chunk_cols, vocab_chunks
from ._partials import ONE_HEAD, PLANES, Partials, merge
from ._spec import Divergence, Head, Needs
from .kernels import (chunk_kl_probs_kernel, chunk_logits_kernel, chunk_probs_kernel, jsd_fwd_kernel, kept_dz_kernel,
                      kl_dz_kernel, kl_fwd_kernel, logprob_dz_kernel, logprob_fwd_kernel, mm_acc_kernel)
from .kernels.frozen import FIELDS as FROZEN_FIELDS
from .kernels.frozen import KL_FIELDS as FROZEN_KL_FIELDS


def _xf(head: Head, ref=False):
    """Kernel arguments of one head's logit transform (cap, then scale; None = off)."""
    pre, flag = ("ref_", "HAS_REF_") if ref else ("", "HAS_")
    softcap, scale = head.xf.softcap, head.xf.scale
    return {f"{pre}softcap": 1.0 if softcap is None else softcap, f"{pre}scale": 1.0 if scale is None else scale,
            f"{flag}SOFTCAP": softcap is not None, f"{flag}SCALE": scale is not None}


def _bias(head: Head):
    return head.b if head.b is not None else head.h


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


def logprob_partials(pol: Head, y, with_stats: bool) -> Partials:
    """The forward's per-row partials merged over its splits ([3 or 7, Nv], argmax ids [Nv] or
    None). Targets y outside [0, V) have no target logit (zy = 0): a vocabulary shard's rows whose
    target another rank holds."""
    h, w = pol.h, pol.w
    n, d = h.shape
    vocab = w.shape[0]
    nf = ONE_HEAD if with_stats else 3

    def run(tiles: config.Tiles):
        n_blocks, v_per_split, splits = _splits(n, vocab, d, h.element_size(), tiles, h.device)
        part = config.empty((nf, splits, n), torch.float32, h.device)
        arg = config.empty((splits, n), torch.int32, h.device) if with_stats else None
        logprob_fwd_kernel[(n_blocks * splits,)](
            h, w, _bias(pol), y, part, arg if arg is not None else part,
            n, vocab, d, v_per_split, splits,
            h.stride(0), h.stride(1), w.stride(0), w.stride(1),
            HAS_BIAS=pol.b is not None, STATS=with_stats, **_xf(pol),
            DOT_FP32=_dot_fp32(h.dtype), **tiles.constexprs(), **tiles.launch(),
        )
        return part, arg

    tiles = _tiles("fwd_stats" if with_stats else "fwd", h, (triton.next_power_of_2(n), vocab, d, with_stats), run)
    return Partials(*merge(*run(tiles)))


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


def _backward_chunks(pol: Head, needs: Needs, fill_dz, dh_dtype=None, acc=None):
    """Drives a backward through vocabulary chunks of the logit gradient dz.

    fill_dz(dz_view, v0, v1, need_b) writes dz[:, v0:v1] (operand dtype) into dz_view
    [Nv, v1 - v0] and, with need_b, returns per-row-block fp32 column sums [blocks, v1 - v0] of the
    unrounded dz. Per chunk: dW[v0:v1] = dz^T @ h (one rounding, cuBLAS), db[v0:v1] = the sum of
    those partials, dH += dz @ W[v0:v1] into an fp32 accumulator (mm_acc kernel), rounded once
    (to dh_dtype if given, else h's dtype). With acc, dW and db are added into acc.dw, acc.db (fp32)
    instead of allocated.
    """
    h, w = pol.h, pol.w
    n, d = h.shape
    vocab = w.shape[0]
    tiles = config.tiles("dz", h.device, h.dtype)
    cols = vocab_chunk_cols(n, vocab, h.element_size(), tiles.BLOCK_V, default_mb=schedule.DEFAULT_CHUNK_MB,
                            max_cols=schedule.DEFAULT_CHUNK_COLS)
    dz = config.empty((n, cols), h.dtype, h.device)
    dh = torch.zeros((n, d), dtype=torch.float32, device=h.device) if needs.h else None
    dw = config.empty((vocab, d), w.dtype, w.device) if needs.w and acc is None else None
    db = config.empty((vocab,), torch.float32, w.device) if needs.b and acc is None else None
    for v0, v1 in vocab_chunks(vocab, cols):
        dzc = dz[:, : v1 - v0]
        db_part = fill_dz(dzc, v0, v1, needs.b)
        if needs.w:
            if acc is None:
                torch.mm(dzc.t(), h, out=dw[v0:v1])
            else:
                acc.dw[v0:v1] += torch.mm(dzc.t(), h).to(acc.dw.dtype)
        if needs.b:
            if acc is None:
                torch.sum(db_part, dim=0, out=db[v0:v1])
            else:
                acc.db[v0:v1] += db_part.sum(0).to(acc.db.dtype)
        if needs.h:
            _mm_acc(dzc, w[v0:v1], dh)
    return (dh.to(dh_dtype or h.dtype) if needs.h else None), dw, db


def _chunk_logits(head: Head, z_buf, v0, v1):
    """z_buf[:, :v1 - v0] = the head's transformed logits of columns v0:v1 (fp32); returns their
    row max."""
    h, w = head.h, head.w
    n, d = h.shape
    tiles = config.tiles("logits", h.device, h.dtype)
    n_tiles = triton.cdiv(v1 - v0, tiles.BLOCK_V)
    tmax = config.empty((n_tiles, n), torch.float32, h.device)
    chunk_logits_kernel[(triton.cdiv(n, tiles.BLOCK_N) * n_tiles,)](
        h, w, _bias(head), z_buf, tmax, n, w.shape[0], d, v0, v1 - v0,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1), z_buf.stride(0),
        HAS_BIAS=head.b is not None, **_xf(head), DOT_FP32=_dot_fp32(h.dtype), GROUP_M=schedule.GROUP_M,
        **tiles.constexprs(), **tiles.launch(),
    )
    return tmax.amax(0)


def _fold_tiles(part, arg, c, tile_part, tile_arg, fields, sums_of):
    """Chunk c's partials (planes of PLANES; 0..6 are logprob_fwd_kernel's) from its tiles',
    which share the chunk's reference maxes: the named sums of (plane, field) pairs and, with
    tile_arg, the statistics (sums, and the max and argmax of the first tile holding the max)."""
    sums = tile_part.sum(1)
    for plane, field in sums_of:
        part[PLANES[plane], c] = sums[fields[field]]
    if tile_arg is not None:
        for plane in ("zsum", "pz", "q"):
            part[PLANES[plane], c] = sums[fields[plane]]
        amax = tile_part[fields["amax"]]
        best = amax.argmax(0, keepdim=True)
        part[PLANES["amax"], c] = amax.gather(0, best).squeeze(0)
        arg[c] = tile_arg.gather(0, best).squeeze(0)


def _frozen_chunks(pol: Head, elem_bytes: int):
    """The frozen sweep's vocabulary chunks (the backward's chunk width)."""
    n, vocab = pol.h.shape[0], pol.w.shape[0]
    tiles = config.tiles("dz", pol.h.device, pol.h.dtype)
    cols = vocab_chunk_cols(n, vocab, elem_bytes, tiles.BLOCK_V, default_mb=schedule.DEFAULT_CHUNK_MB,
                            max_cols=schedule.DEFAULT_CHUNK_COLS)
    return cols, list(vocab_chunks(vocab, cols))


def logprob_partials_frozen(pol: Head, y, with_stats: bool) -> Partials:
    """The frozen-head sweep (kernels/frozen.py): the merged partials and argmax ids as
    logprob_partials', and acc_p [Nv, D] fp32 = sum_v exp(z_v - m) k(z_v) W[v] relative to the
    merged max m (2 N D V FLOPs of logits + 2 N D V of P @ W)."""
    return _one_head_sweep(pol, y, with_stats)[0]


def _one_head_sweep(pol: Head, y, with_stats: bool, keep: torch.Tensor | None = None):
    """The one-head chunk sweep: per vocabulary chunk the fp32 logits, then P = k(z) exp(z - m_c)
    (m_c the running max) and the chunk's partials. Without keep P is consumed, acc = alpha acc +
    P @ W (the frozen path); with keep [Nv, V] (operand dtype) P is written into it (the gradients-
    in-forward path). Returns (Partials, the running max after each chunk [chunks, Nv], chunks)."""
    h, w = pol.h, pol.w
    n, d = h.shape
    cols, chunks = _frozen_chunks(pol, 4)
    f = torch.float32
    z_buf = config.empty((n, cols), f, h.device)
    p_buf = config.empty((n, cols), h.dtype, h.device) if keep is None else None
    acc = torch.zeros((n, d), dtype=f, device=h.device) if keep is None else None
    m_run = torch.full((n,), float("-inf"), dtype=f, device=h.device)
    m_chunks = torch.empty((len(chunks), n), dtype=f, device=h.device)
    # per chunk, partials relative to its running max: planes as logprob_fwd_kernel's
    part = config.empty((ONE_HEAD if with_stats else 3, len(chunks), n), f, h.device)
    arg = config.empty((len(chunks), n), torch.int32, h.device) if with_stats else None
    pt = config.tiles("probs", h.device, h.dtype)
    n_blocks = triton.cdiv(n, pt.BLOCK_N)
    xf = _xf(pol)
    for c, (v0, v1) in enumerate(chunks):
        n_tiles = triton.cdiv(v1 - v0, pt.BLOCK_V)
        m_new = torch.maximum(m_run, _chunk_logits(pol, z_buf, v0, v1))
        tile_part = config.empty((len(FROZEN_FIELDS), n_tiles, n), f, h.device)
        tile_arg = config.empty((n_tiles, n), torch.int32, h.device) if with_stats else None
        out = p_buf if keep is None else keep[:, v0:v1]
        chunk_probs_kernel[(n_blocks * n_tiles,)](
            z_buf, y, m_new, out, tile_part, tile_arg if with_stats else tile_part,
            n, v0, v1 - v0, n_tiles, z_buf.stride(0), out.stride(0), **xf,
            STATS=with_stats, BLOCK_N=pt.BLOCK_N, BLOCK_V=pt.BLOCK_V, num_warps=pt.num_warps,
        )
        part[PLANES["m_z"], c] = m_new
        _fold_tiles(part, arg, c, tile_part, tile_arg, FROZEN_FIELDS, (("l_z", "l"), ("zy", "zy")))
        if keep is None:
            alpha = torch.exp(m_run - m_new)                        # 0 before the first chunk
            _mm_acc(p_buf[:, : v1 - v0], w[v0:v1], acc, row_scale=alpha)
        m_chunks[c] = m_run = m_new
    return Partials(*merge(part, arg), acc), m_chunks, tuple(chunks)


def _stats_grad_args(g_stats, stats, fallback):
    """(gst, st) pointers for STATS_GRAD: the statistics' upstream gradient and values [n, 4]."""
    if g_stats is None:
        return fallback, fallback
    return g_stats.float().contiguous(), stats.float().contiguous()


def _logprob_backward(pol: Head, y, saved, grads, needs: Needs, dh_dtype, acc=None):
    """Gradients of sum_i g_i * logp_i (+ sum_i <g_stats_i, stats_i>) w.r.t. the head."""
    h, w = pol.h, pol.w
    n, d = h.shape
    vocab = w.shape[0]
    g = (grads.logp if grads.logp is not None else torch.zeros_like(saved.lse)).float().contiguous()
    lse = saved.lse.float().contiguous()
    gst, st = _stats_grad_args(grads.stats, saved.stats, g)

    def fill(dzc, v0, v1, need_db):
        def run(tiles):
            n_blocks = triton.cdiv(n, tiles.BLOCK_N)
            db_part = config.empty((n_blocks, v1 - v0), torch.float32, h.device) if need_db else None
            logprob_dz_kernel[(n_blocks * triton.cdiv(v1 - v0, tiles.BLOCK_V),)](
                h, w, _bias(pol), y, lse, g, gst, st, dzc, db_part if need_db else lse,
                n, vocab, d, v0, v1 - v0,
                h.stride(0), h.stride(1), w.stride(0), w.stride(1), dzc.stride(0),
                db_part.stride(0) if need_db else 0,
                HAS_BIAS=pol.b is not None, **_xf(pol), STATS_GRAD=grads.stats is not None, HAS_DB=need_db,
                DOT_FP32=_dot_fp32(h.dtype), GROUP_M=schedule.GROUP_M, **tiles.constexprs(), **tiles.launch(),
            )
            return db_part
        kind = "dz" if grads.stats is None else "dz_stats"
        return run(_tiles(kind, h, (triton.next_power_of_2(n), v1 - v0, d), run))

    return _backward_chunks(pol, needs, fill, dh_dtype, acc)


def _jsd_logs(mix):
    return math.log1p(-mix), math.log(mix)


def _two_heads(pol: Head, ref: Head):
    """(pointers, strides, flags) of a two-head kernel launch."""
    h, w, rh, rw = pol.h, pol.w, ref.h, ref.w
    heads = (h, w, _bias(pol), rh, rw, _bias(ref))
    strides = (h.stride(0), h.stride(1), w.stride(0), w.stride(1), rh.stride(0), rh.stride(1), rw.stride(0),
               rw.stride(1))
    flags = dict(HAS_BIAS=pol.b is not None, HAS_REF_BIAS=ref.b is not None, **_xf(pol), **_xf(ref, ref=True),
                 DOT_FP32=_dot_fp32(h.dtype), REF_DOT_FP32=_dot_fp32(rh.dtype))
    return heads, strides, flags


def kl_partials(pol: Head, ref: Head, y, with_stats: bool, div: Divergence) -> Partials:
    """The two-head forward's per-row partials merged over its splits ([11, Nv] planes of
    fusedpref/_partials.py, argmax ids [Nv] or None); the a plane is div's KL (none for the JSD);
    y None: no target logits."""
    h = pol.h
    n, d = h.shape
    vocab = pol.w.shape[0]
    logp_on = y is not None
    if with_stats and not logp_on:
        raise ValueError("with_stats needs the targets y")
    tiles = config.tiles("kl_fwd_stats" if with_stats else "kl_fwd", h.device, h.dtype)
    n_blocks, v_per_split, splits = _splits(n, vocab, d, max(h.element_size(), ref.h.element_size()), tiles,
                                            h.device)
    part = config.empty((len(PLANES), splits, n), torch.float32, h.device)
    arg = config.empty((splits, n), torch.int32, h.device) if with_stats else None
    heads, strides, flags = _two_heads(pol, ref)
    kl_fwd_kernel[(n_blocks * splits,)](
        *heads, y if logp_on else part, part, arg if arg is not None else part,
        n, vocab, d, ref.h.shape[1], v_per_split, splits, *strides,
        DIV=int(div), LOGP=logp_on, STATS=with_stats, **flags, **tiles.constexprs(), **tiles.launch(),
    )
    if not logp_on:
        part[PLANES["zy"]], part[PLANES["ry"]] = 0.0, 0.0
    return Partials(*merge(part, arg, div))


def kl_partials_frozen(pol: Head, ref: Head, y, with_stats: bool) -> Partials:
    """KL(p_ref || p) with a frozen policy head, one sweep by vocabulary chunks
    (kernels/frozen.py): the merged partials and argmax ids as kl_partials' (FORWARD_KL), and
    acc_p, acc_q [Nv, D] fp32 = sum_v exp(z_v - m_z) k(z_v) W[v] and sum_v exp(r_v - m_r) k(z_v) W[v]
    relative to the merged maxes. 4 N D V FLOPs of logits (both heads) + 4 N D V of P @ W and Q @ W."""
    return _two_head_sweep(pol, ref, y, with_stats)[0]


def _two_head_sweep(pol: Head, ref: Head, y, with_stats: bool, keep=None):
    """The two-head (forward KL) chunk sweep, as _one_head_sweep with P and Q = k(z) exp(r - mr_c):
    consumed into acc_p, acc_q, or written into keep = (kept_p, kept_q) [Nv, V]. Returns (Partials,
    the running maxes after each chunk (m [chunks, Nv], mr [chunks, Nv]), chunks)."""
    h, w = pol.h, pol.w
    n, d = h.shape
    logp_on = y is not None
    if with_stats and not logp_on:
        raise ValueError("with_stats needs the targets y")
    cols, chunks = _frozen_chunks(pol, 8)
    f = torch.float32
    yk = y if logp_on else torch.full((n,), -1, dtype=torch.long, device=h.device)
    z_buf, r_buf = config.empty((n, cols), f, h.device), config.empty((n, cols), f, h.device)
    if keep is None:
        p_buf, q_buf = config.empty((n, cols), h.dtype, h.device), config.empty((n, cols), h.dtype, h.device)
        acc_p = torch.zeros((n, d), dtype=f, device=h.device)
        acc_q = torch.zeros((n, d), dtype=f, device=h.device)
    else:
        acc_p = acc_q = None
    mz_run = torch.full((n,), float("-inf"), dtype=f, device=h.device)
    mr_run = mz_run.clone()
    m_chunks = torch.empty((2, len(chunks), n), dtype=f, device=h.device)
    part = torch.zeros((len(PLANES), len(chunks), n), dtype=f, device=h.device)
    arg = config.empty((len(chunks), n), torch.int32, h.device) if with_stats else None
    pt = config.tiles("probs", h.device, h.dtype)
    n_blocks = triton.cdiv(n, pt.BLOCK_N)
    xf = _xf(pol)
    K = FROZEN_KL_FIELDS
    for c, (v0, v1) in enumerate(chunks):
        n_tiles = triton.cdiv(v1 - v0, pt.BLOCK_V)
        mz_new = torch.maximum(mz_run, _chunk_logits(pol, z_buf, v0, v1))
        mr_new = torch.maximum(mr_run, _chunk_logits(ref, r_buf, v0, v1))
        tile_part = config.empty((len(K), n_tiles, n), f, h.device)
        tile_arg = config.empty((n_tiles, n), torch.int32, h.device) if with_stats else None
        po, qo = (p_buf, q_buf) if keep is None else (keep[0][:, v0:v1], keep[1][:, v0:v1])
        chunk_kl_probs_kernel[(n_blocks * n_tiles,)](
            z_buf, r_buf, yk, mz_new, mr_new, po, qo, tile_part, tile_arg if with_stats else tile_part,
            n, v0, v1 - v0, n_tiles, z_buf.stride(0), po.stride(0), **xf,
            STATS=with_stats, BLOCK_N=pt.BLOCK_N, BLOCK_V=pt.BLOCK_V, num_warps=pt.num_warps,
        )
        part[PLANES["m_z"], c], part[PLANES["m_r"], c] = mz_new, mr_new
        _fold_tiles(part, arg, c, tile_part, tile_arg, K,
                    (("l_z", "l"), ("zy", "zy"), ("l_r", "l_r"), ("ry", "ry"), ("a", "a")))
        if keep is None:
            _mm_acc(p_buf[:, : v1 - v0], w[v0:v1], acc_p, row_scale=torch.exp(mz_run - mz_new))
            _mm_acc(q_buf[:, : v1 - v0], w[v0:v1], acc_q, row_scale=torch.exp(mr_run - mr_new))
        mz_run, mr_run = mz_new, mr_new
        m_chunks[0, c], m_chunks[1, c] = mz_new, mr_new
    return Partials(*merge(part, arg, Divergence.FORWARD_KL), acc_p, acc_q), m_chunks, tuple(chunks)


def jsd_sums(pol: Head, ref: Head, lse, rlse, mix: float):
    """The generalised JSD's second pass given both heads' lse [Nv]: (jsd, KL(p || m)) [Nv], sums
    over the vocabulary of pol.w (a shard's part of the sums, given the global lse)."""
    h = pol.h
    n, d = h.shape
    heads, strides, flags = _two_heads(pol, ref)
    tiles = config.tiles("kl_fwd", h.device, h.dtype)
    n_blocks, v_per_split, splits = _splits(n, pol.w.shape[0], d, max(h.element_size(), ref.h.element_size()),
                                            tiles, h.device)
    part = config.empty((2, splits, n), torch.float32, h.device)
    log_1mb, log_b = _jsd_logs(mix)
    jsd_fwd_kernel[(n_blocks * splits,)](
        *heads, lse.float().contiguous(), rlse.float().contiguous(), part, n, pol.w.shape[0], d, ref.h.shape[1],
        v_per_split, splits, *strides, beta=mix, log_1mb=log_1mb, log_b=log_b, **flags, **tiles.constexprs(),
        **tiles.launch(),
    )
    return part[0].sum(0), part[1].sum(0)


def _kl_backward(call, pol: Head, ref: Head, y, saved, grads, needs: Needs, dh_dtype, acc=None):
    """Gradients of sum_i g_i * div_i (+ sum_i g_lp_i * logp_i, given targets y; + the stats'
    upstream gradient) w.r.t. the policy's h, w, b: one recompute of both heads for all terms."""
    h, w, rh = pol.h, pol.w, ref.h
    n, d = h.shape
    vocab = w.shape[0]
    lse, rlse = saved.lse.float().contiguous(), saved.rlse.float().contiguous()
    g = (grads.div if grads.div is not None else torch.zeros_like(lse)).float().contiguous()
    logp_on = grads.logp is not None
    g_lp = grads.logp.float().contiguous() if logp_on else g
    div = call.divergence
    aux = g if div == Divergence.FORWARD_KL else saved.aux.float().contiguous()
    gst, st = _stats_grad_args(grads.stats, saved.stats, g)
    tiles = config.tiles("kl_dz", h.device, h.dtype)
    log_1mb, log_b = _jsd_logs(call.mix) if div == Divergence.JSD else (0.0, 0.0)
    heads, strides, flags = _two_heads(pol, ref)

    def fill(dzc, v0, v1, need_db):
        n_blocks = triton.cdiv(n, tiles.BLOCK_N)
        db_part = config.empty((n_blocks, v1 - v0), torch.float32, h.device) if need_db else None
        kl_dz_kernel[(n_blocks * triton.cdiv(v1 - v0, tiles.BLOCK_V),)](
            *heads, lse, rlse, g, aux, y if logp_on else g, g_lp, gst, st, dzc, db_part if need_db else g,
            n, vocab, d, rh.shape[1], v0, v1 - v0, *strides, dzc.stride(0),
            db_part.stride(0) if need_db else 0, beta=float(call.mix), log_1mb=log_1mb, log_b=log_b,
            DIV=int(div), LOGP=logp_on, STATS_GRAD=grads.stats is not None, HAS_DB=need_db,
            GROUP_M=schedule.GROUP_M, **flags, **tiles.constexprs(), **tiles.launch(),
        )
        return db_part

    return _backward_chunks(pol, needs, fill, dh_dtype, acc)


def backward(call, pol: Head, ref: Head | None, y, saved, grads, needs: Needs, dh_dtype=None, acc=None):
    """(dH [Nv, D] or None, dW [V, D] or None, db [V] or None) of sum_i <grads_i, outputs_i> w.r.t.
    the policy head (fusedpref.chunked.backward has the formulas): per vocabulary chunk a dz kernel
    recomputes the logits (both heads' for a two-head call), then dW, db and the fp32 dH."""
    if ref is None:
        return _logprob_backward(pol, y, saved, grads, needs, dh_dtype, acc)
    return _kl_backward(call, pol, ref, y, saved, grads, needs, dh_dtype, acc)


# ---------------------------------------------------------------- gradients in forward (kept P)

class Kept(NamedTuple):
    """As fusedpref.chunked.Kept: p (and q) [Nv, V] in the operand dtype, the running maxes m (mr)
    [chunks, Nv] fp32 each chunk's P (Q) is relative to, and the chunks' bounds."""
    p: torch.Tensor
    m: torch.Tensor
    q: torch.Tensor | None
    mr: torch.Tensor | None
    bounds: tuple


def kept_partials(pol: Head, ref: Head | None, y, with_stats: bool):
    """The gradients-in-forward path's forward: the frozen path's chunk sweep (kernels/frozen.py)
    with P = k(z) exp(z - m_c) (and Q) kept in [Nv, V] buffers of the operand dtype instead of
    consumed (2 N D V FLOPs per head): (Partials, Kept)."""
    n, vocab = pol.h.shape[0], pol.w.shape[0]
    keep_p = config.empty((n, vocab), pol.h.dtype, pol.h.device)
    if ref is None:
        part, m, bounds = _one_head_sweep(pol, y, with_stats, keep_p)
        return part, Kept(keep_p, m, None, None, bounds)
    keep_q = config.empty((n, vocab), pol.h.dtype, pol.h.device)
    part, m, bounds = _two_head_sweep(pol, ref, y, with_stats, (keep_p, keep_q))
    return part, Kept(keep_p, m[0], keep_q, m[1], bounds)


def kept_backward(pol: Head, y, kept: Kept, coefs, needs: Needs, acc, grad_filter: float = 0.0, row_scale=None):
    """As fusedpref.chunked.kept_backward: per kept chunk, dz = cp exp(m_c - M) P (+ cq exp(mr_c - Mr)
    Q) + onehot(y) g_y formed in fp32 by kept_dz_kernel and rounded once into the kept buffer (the
    operand dtype, as the recompute path's dz: P read and dz written once), then dW[c] (cuBLAS),
    db[c] (the kernel's column sums of the unrounded dz) and dH += dz @ W[c] (mm_acc, fp32). acc.dw,
    acc.db accumulate over pair chunks (fp32); returns dH [Nv, D] fp32. (grad_filter: torch backend
    only, functions.resolve refuses it here.)"""
    assert grad_filter <= 0, "grad_filter on the Triton backend"
    cp, big, cq, big_r, g_y = coefs
    h, w = pol.h, pol.w
    n, d = h.shape
    dh = torch.zeros((n, d), dtype=torch.float32, device=h.device) if needs.h else None
    pt = config.tiles("probs", h.device, h.dtype)
    n_blocks = triton.cdiv(n, pt.BLOCK_N)
    g_y = g_y.float().contiguous()
    for c, (v0, v1) in enumerate(kept.bounds):
        dz = kept.p[:, v0:v1]
        n_tiles = triton.cdiv(v1 - v0, pt.BLOCK_V)
        a = (cp * torch.exp(kept.m[c] - big)).float().contiguous()
        b = None if kept.q is None else (cq * torch.exp(kept.mr[c] - big_r)).float().contiguous()
        db_part = config.empty((n_blocks, v1 - v0), torch.float32, h.device) if needs.b else None
        kept_dz_kernel[(n_blocks * n_tiles,)](
            dz, dz if kept.q is None else kept.q[:, v0:v1], a, a if b is None else b, y, g_y,
            a if db_part is None else db_part, n, v0, v1 - v0, n_tiles, dz.stride(0),
            0 if db_part is None else db_part.stride(0),
            BLOCK_N=pt.BLOCK_N, BLOCK_V=pt.BLOCK_V, HAS_Q=kept.q is not None, HAS_DB=db_part is not None,
            num_warps=pt.num_warps,
        )
        if needs.b:
            acc.db[v0:v1] += db_part.sum(0)
        if needs.w:
            part = torch.mm(dz.t(), h)
            if acc.dw.dtype == part.dtype:
                acc.dw[v0:v1] += part
            else:
                acc.dw[v0:v1] += part.float()
        if needs.h:
            _mm_acc(dz, w[v0:v1], dh)
    return dh
