"""The pure-PyTorch backend: the same verbs, contract and memory bound as the Triton one
(fusedpref/ops.py), any device.

It walks the vocabulary in chunks with an online log-sum-exp, updating its chunk buffers in place,
and computes in fp32 throughout (float64 for float64 inputs, so that torch.autograd.gradcheck can
be used). Memory: every pass knows how many rows x chunk buffers it holds at once (`parts`) and
sizes its chunk so that all of them together stay within the chunk budget (FUSEDPREF_CHUNK_MB;
8 MiB on the CPU, 256 MiB on CUDA); tests/test_memory.py bounds the peak. Every function takes compacted rows
(ignored targets removed) as `Head` bundles (fusedpref/_spec.py).

Verbs (both backends): logprob_partials, logprob_partials_frozen, kl_partials,
kl_partials_frozen (-> fusedpref._partials.Partials of this vocabulary), jsd_sums, backward.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import config
from ._chunks import vocab_chunk_cols, vocab_chunks
from ._partials import Partials, acc_dtype, transform_grad
from ._spec import Divergence, Head, Needs, Transform


def _cols(n, vocab, dtype, parts=1, cuda=False):
    """Chunk columns for `parts` live rows x cols buffers of the compute dtype within the budget
    (default 8 MiB on the CPU, 256 MiB on CUDA, where small chunks would be many small matmuls)."""
    return max(1, vocab_chunk_cols(n, vocab, acc_dtype(dtype).itemsize, default_mb=256 if cuda else 8) // parts)


def _chunks(head: Head, parts: int):
    return vocab_chunks(head.w.shape[0], _cols(head.h.shape[0], head.w.shape[0], head.h.dtype, parts,
                                               head.h.is_cuda))


def chunk_logits(head: Head, hf, v0, v1):
    """Logits softcap(hf w^T + b) * scale of columns v0:v1 for rows hf (the head's rows in the
    compute dtype)."""
    z = hf @ head.w[v0:v1].to(hf.dtype).t()
    if head.b is not None:
        z += head.b[v0:v1].to(hf.dtype)
    if head.xf.softcap is not None:
        z.div_(head.xf.softcap).tanh_().mul_(head.xf.softcap)
    if head.xf.scale is not None:
        z *= head.xf.scale
    return z


def stats_grad(p, logp, g_stats, stats):
    """Gradient w.r.t. the logits of sum_i <g_stats_i, stats_i> (kernels/tiles.py stats_grad):
    g_sum - g_H p (log p + H) + 2 g_Q p (p / Q - 1); the argmax hit has none."""
    g_sum, g_ent, g_q = g_stats[:, 0:1], g_stats[:, 1:2], g_stats[:, 3:4]
    ent, inv_q = stats[:, 1:2], torch.exp(-stats[:, 3:4])
    return g_sum - g_ent * p * (logp + ent) + 2.0 * g_q * p * (p * inv_q - 1.0)


def _target_in_chunk(z, y, v0, v1):
    """z[i, y_i - v0] where v0 <= y_i < v1, else 0."""
    inside = (y >= v0) & (y < v1)
    local = (y - v0).clamp(0, v1 - v0 - 1)
    return torch.where(inside, z.gather(1, local[:, None]).squeeze(1), 0.0)


class _OnlinePass:
    """One head's online pass over vocabulary chunks, in fp32: the log-sum-exp, with targets y the
    target logit, and with stats the metric statistics (sum of logits, the entropy's E_p[z] kept
    relative to the running max so that it does not cancel against lse, first argmax)."""

    def __init__(self, n, device, y=None, with_stats=False, dtype=torch.float32):
        if with_stats and y is None:
            raise ValueError("with_stats needs the targets y")
        self.y, self.with_stats = y, with_stats
        f = dict(device=device, dtype=dtype)
        self.m = torch.full((n,), float("-inf"), **f)
        self.l = torch.zeros(n, **f)
        self.zy = torch.zeros(n, **f)
        if with_stats:
            self.zsum, self.pz = torch.zeros(n, **f), torch.zeros(n, **f)
            self.amax = torch.full((n,), float("-inf"), **f)
            self.aidx = torch.zeros(n, dtype=torch.long, device=device)
            self.q = torch.zeros(n, **f)

    def add(self, z, v0, v1):
        """Folds in the logits z of columns v0:v1, overwriting z; returns the rescaling factor of
        the running sum and this chunk's exp(z - new max) (z's buffer itself without stats: one
        chunk buffer; with stats a second one)."""
        if self.with_stats:
            cmax, carg = z.max(dim=1)
        else:
            cmax = z.amax(1)
        m, l = self.m, self.l
        m_new = torch.maximum(m, cmax)
        alpha = torch.exp(m - m_new)
        if self.y is not None:
            self.zy += _target_in_chunk(z, self.y, v0, v1)
        if self.with_stats:
            self.zsum += z.sum(1)
        zm = z.sub_(m_new[:, None])
        if not self.with_stats:
            p = zm.exp_()
        else:
            p = zm.exp()                                  # the second chunk buffer
            # sum exp(z - m)(z - m): rescale to the new max (0 before the first chunk), add this chunk
            carried = torch.where(l > 0, m - m_new, 0.0) * l
            self.pz = alpha * (self.pz + carried) + torch.einsum("ij,ij->i", p, zm)
            better = cmax > self.amax
            self.aidx = torch.where(better, carg + v0, self.aidx)
            self.amax = torch.where(better, cmax, self.amax)
            self.q = self.q * alpha * alpha + torch.einsum("ij,ij->i", p, p)
        self.l = l * alpha + p.sum(1)
        self.m = m_new
        return alpha, p

    def planes(self):
        """The partials of fusedpref/_partials.py, relative to this pass's max: [3 or 7, Nv]
        (m, l, zy, and with stats zsum, pz, amax, q) and the argmax ids [Nv] or None."""
        if not self.with_stats:
            return torch.stack([self.m, self.l, self.zy]), None
        return torch.stack([self.m, self.l, self.zy, self.zsum, self.pz, self.amax, self.q]), self.aidx


def logprob_partials(pol: Head, y, with_stats: bool) -> Partials:
    """The one-head forward's partials over this vocabulary ([3 or 7, Nv], argmax ids or None);
    targets outside [0, V) have no target logit (another shard's)."""
    hf = pol.h.to(acc_dtype(pol.h.dtype))
    run = _OnlinePass(pol.h.shape[0], pol.h.device, y, with_stats, hf.dtype)
    for v0, v1 in _chunks(pol, parts=2 if with_stats else 1):
        run.add(chunk_logits(pol, hf, v0, v1), v0, v1)
    return Partials(*run.planes())


def logprob_partials_frozen(pol: Head, y, with_stats: bool) -> Partials:
    """The frozen head's sweep: per chunk the logits (2 n D C FLOPs), then acc = alpha acc +
    (p k) @ W_chunk (2 n D C): the partials and acc_p [Nv, D] relative to the pass's max."""
    run, acc, _, _ = _one_head_sweep(pol, y, with_stats)
    return Partials(*run.planes(), acc)


def _one_head_sweep(pol: Head, y, with_stats: bool, keep=None):
    """Per vocabulary chunk the logits, then P = k(z) exp(z - m_c) (m_c the running max). Without
    keep P is consumed, acc = alpha acc + P @ W (the frozen path); with keep [Nv, V] it is written
    into it (gradients in forward). Returns (the online pass, acc or None, the running max after
    each chunk [chunks, Nv] or None, the chunks)."""
    n, dd = pol.h.shape
    hf = pol.h.to(acc_dtype(pol.h.dtype))
    run = _OnlinePass(n, pol.h.device, y, with_stats, hf.dtype)
    acc = torch.zeros((n, dd), dtype=hf.dtype, device=hf.device) if keep is None else None
    # live: z (then p), the chain with a cap or scale, p apart with stats
    bounds = tuple(_chunks(pol, parts=1 + (pol.xf != Transform()) + with_stats))
    m = torch.empty((len(bounds), n), dtype=hf.dtype, device=hf.device) if keep is not None else None
    for c, (v0, v1) in enumerate(bounds):
        z = chunk_logits(pol, hf, v0, v1)
        chain = transform_grad(z, pol.xf)                # before add: with stats it overwrites z
        alpha, p = run.add(z, v0, v1)
        if chain is not None:
            p = p.mul_(chain)
        if keep is None:
            acc = torch.addmm(acc.mul_(alpha[:, None]), p, pol.w[v0:v1].to(hf.dtype))   # (FlopCounterMode counts addmm)
        else:
            keep[:, v0:v1], m[c] = p, run.m
        del z, p, chain                          # before the next chunk's buffers exist
    return run, acc, m, bounds


class Kept(NamedTuple):
    """The kept-logits forward's buffers (gradients in forward, fusedpref/_library.py): p [Nv, V] =
    k(z) exp(z - m_c) of each vocabulary chunk c relative to the running max m_c at that chunk
    (m [chunks, Nv]), and with a reference head q [Nv, V] = k(z) exp(r - mr_c) (mr); bounds the
    chunks' (v0, v1). k is the policy's cap-and-scale chain."""
    p: torch.Tensor
    m: torch.Tensor
    q: Optional[torch.Tensor]
    mr: Optional[torch.Tensor]
    bounds: tuple


def kept_partials(pol: Head, ref: Head | None, y, with_stats: bool):
    """The forward of the gradients-in-forward path over this vocabulary: the frozen path's sweep
    with P (and Q) kept instead of consumed: (Partials as logprob_partials / kl_partials with the
    forward KL, Kept) in the compute dtype (2 N D V FLOPs per head)."""
    keep_p = torch.empty((pol.h.shape[0], pol.w.shape[0]), dtype=acc_dtype(pol.h.dtype), device=pol.h.device)
    if ref is None:
        run, _, m, bounds = _one_head_sweep(pol, y, with_stats, keep_p)
        return Partials(*run.planes()), Kept(keep_p, m, None, None, bounds)
    keep_q = torch.empty_like(keep_p)
    part, (m, mr, bounds) = _kl_sweep(pol, ref, y, with_stats, Divergence.FORWARD_KL, False, (keep_p, keep_q))
    return part, Kept(keep_p, m, keep_q, mr, bounds)


# the gradient filter's block: a (row block x vocabulary tile) of dz whose largest |dz| relative to
# its rows' upstream gradients is below the threshold does no dH or dW work (Cut Cross-Entropy's
# gradient filtering, at the Triton kernels' tile sizes)
FILTER_ROWS, FILTER_COLS = 16, 128


def _products(dz, hf, w_chunk, needs: Needs, dh, dw_out, db_out, accumulate: bool, grad_filter: float,
              row_scale=None):
    """dW (dw_out = or += dz^T h), db (the same with dz's column sums) and dh += dz @ W_chunk of one
    chunk of dz [n, C]. With grad_filter > 0 and row_scale [n] (each row's upstream gradient
    magnitude: |dz| / row_scale is the softmax probability for a plain head), each
    FILTER_COLS-wide tile's products run only over the FILTER_ROWS row blocks in which some
    |dz| / row_scale reaches grad_filter (db stays exact: no matmul)."""
    if needs.b:
        if accumulate:
            db_out += dz.sum(0)
        else:
            torch.sum(dz, 0, out=db_out)
    if grad_filter <= 0 or row_scale is None:
        if needs.w:        # (a chunk x D temporary; FlopCounterMode does not count mm's out= variant)
            if accumulate:
                dw_out += dz.t() @ hf
            else:
                dw_out[:] = dz.t() @ hf
        if needs.h:        # (an N x D temporary; FlopCounterMode does not count in-place addmm_)
            dh += dz @ w_chunk
        return
    n, c = dz.shape
    blocks, tiles = -(-n // FILTER_ROWS), -(-c // FILTER_COLS)
    rel = dz.abs().div_(row_scale.clamp(min=torch.finfo(dz.dtype).tiny)[:, None])
    big = torch.nn.functional.pad(rel, (0, tiles * FILTER_COLS - c, 0, blocks * FILTER_ROWS - n))
    del rel
    live = big.view(blocks, FILTER_ROWS, tiles, FILTER_COLS).amax((1, 3)) >= grad_filter     # [blocks, tiles]
    del big
    rows_live = live.repeat_interleave(FILTER_ROWS, 0)[:n]                                    # [n, tiles]
    if needs.w and not accumulate:
        dw_out.zero_()
    for t in live.any(0).nonzero().flatten().tolist():
        c0, c1 = t * FILTER_COLS, min(c, (t + 1) * FILTER_COLS)
        rows = rows_live[:, t].nonzero().flatten()
        part = dz[:, c0:c1] if rows.numel() == n else dz.index_select(0, rows)[:, c0:c1]
        if needs.w:
            dw_out[c0:c1] += part.t() @ (hf if rows.numel() == n else hf.index_select(0, rows))
        if needs.h:
            if rows.numel() == n:
                dh += part @ w_chunk[c0:c1]
            else:
                dh.index_add_(0, rows, part @ w_chunk[c0:c1])


def kept_backward(pol: Head, y, kept: Kept, coefs, needs: Needs, acc, grad_filter: float = 0.0, row_scale=None):
    """dz of the kept chunks and its products, accumulated: per chunk c
        dz = cp exp(m_c - M) p_c (+ cq exp(mr_c - Mr) q_c) + onehot(y) g_y
    (coefs = (cp [Nv], M [Nv], cq [Nv] or None, Mr [Nv] or None, g_y [Nv]: the caller's per-row
    coefficients, g_y already times k(z_y)), built in place in the kept buffer; then acc.dw[c] +=
    dz^T h, acc.db[c] += sum dz, and returns dH [Nv, D] = dz @ W (compute dtype), 2 + 2 N D V FLOPs
    (less the blocks grad_filter skips: _products)."""
    cp, big, cq, big_r, g_y = coefs
    dt = kept.p.dtype
    hf = pol.h.to(dt)
    dh = torch.zeros((hf.shape[0], hf.shape[1]), dtype=dt, device=hf.device) if needs.h else None
    for c, (v0, v1) in enumerate(kept.bounds):
        dz = kept.p[:, v0:v1].mul_((cp * torch.exp(kept.m[c] - big))[:, None])
        if kept.q is not None:
            dz.add_(kept.q[:, v0:v1].mul_((cq * torch.exp(kept.mr[c] - big_r))[:, None]))
        _onehot_add(dz, y, g_y, v0, v1)
        _products(dz, hf, pol.w[v0:v1].to(dt), needs, dh, acc.dw[v0:v1] if needs.w else None,
                  acc.db[v0:v1] if needs.b else None, True, grad_filter, row_scale)
        del dz
    return dh


def _log_mixture(logp, logq, mix):
    """log((1 - mix) p + mix q) in a new buffer (two while it is computed)."""
    out = logp + math.log1p(-mix)
    return torch.logaddexp(out, logq + math.log(mix), out=out)


def _kl_sweep(pol: Head, ref: Head, y, with_stats, div: Divergence, frozen: bool, keep=None):
    """The two-head pass: Partials (a relative to both final maxes; the JSD: none; acc_p, acc_q the
    frozen head's softmax-weighted sums of W rows, frozen only). With keep = (kept_p, kept_q) [Nv, V]
    (forward KL) P and Q are written into them instead, and (Partials, (m, mr [chunks, Nv], the
    chunks)) is returned."""
    n = pol.h.shape[0]
    hf = pol.h.to(acc_dtype(pol.h.dtype))
    rhf = ref.h.to(hf.dtype)
    p_run = _OnlinePass(n, hf.device, y, with_stats, hf.dtype)
    r_run = _OnlinePass(n, hf.device, y, dtype=hf.dtype)
    a = torch.zeros(n, device=hf.device, dtype=hf.dtype)
    acc_p = acc_q = None
    if frozen:   # the softmax-weighted sums of the policy's W rows under p and p_ref (forward KL only)
        acc_p = torch.zeros(pol.h.shape, device=hf.device, dtype=hf.dtype)
        acc_q = torch.zeros_like(acc_p)
    chained = frozen or keep is not None
    # live: z, r, their difference, p apart with stats, the chain of a frozen or kept head
    bounds = tuple(_chunks(pol, parts=3 + with_stats + chained))
    if keep is not None:
        marks = torch.empty((2, len(bounds), n), dtype=hf.dtype, device=hf.device)
    for c, (v0, v1) in enumerate(bounds):
        z, r = chunk_logits(pol, hf, v0, v1), chunk_logits(ref, rhf, v0, v1)
        if div == Divergence.JSD:
            r_run.add(r, v0, v1)
            p_run.add(z, v0, v1)
            del z, r
            continue
        chain = transform_grad(z, pol.xf) if chained else None    # before p_run.add overwrites z
        # KL(first || second) relative to both running maxes; move a to the new maxes (nothing
        # to move before the first chunk), then add this chunk
        forward = div == Divergence.FORWARD_KL
        first, x, second, u = (r_run, r, p_run, z) if forward else (p_run, z, r_run, r)
        m1_old, m2_old, l1_old = first.m, second.m, first.l
        m1_new, m2_new = torch.maximum(m1_old, x.amax(1)), torch.maximum(m2_old, u.amax(1))
        diff = (x - m1_new[:, None]).sub_(u).add_(m2_new[:, None])       # (x - m_x) - (u - m_u)
        alpha_r, p_r = r_run.add(r, v0, v1)
        alpha_z, p_z = p_run.add(z, v0, v1)            # after diff: with stats it overwrites z
        alpha, p1 = (alpha_r, p_r) if forward else (alpha_z, p_z)
        shift = torch.where(l1_old > 0, (m1_old - m1_new) - (m2_old - m2_new), 0.0)
        a = alpha * (a + l1_old * shift) + torch.einsum("ij,ij->i", p1, diff)
        if chain is not None:
            p_z, p_r = p_z.mul_(chain), p_r.mul_(chain)
        if frozen:
            wc = pol.w[v0:v1].to(hf.dtype)
            acc_p = torch.addmm(acc_p.mul_(alpha_z[:, None]), p_z, wc)
            acc_q = torch.addmm(acc_q.mul_(alpha_r[:, None]), p_r, wc)
        if keep is not None:
            keep[0][:, v0:v1], keep[1][:, v0:v1] = p_z, p_r
            marks[0, c], marks[1, c] = p_run.m, r_run.m
        del z, r, diff, p_r, p_z, p1, chain, x, u      # before the next chunk's buffers exist
    planes, arg = p_run.planes()
    if not with_stats:
        planes = torch.cat([planes, planes.new_zeros((4, planes.shape[1]))])
    # (without targets both passes' target logits stayed 0)
    planes = torch.cat([planes, torch.stack([r_run.m, r_run.l, a, r_run.zy])])
    if keep is not None:
        return Partials(planes, arg), (marks[0], marks[1], bounds)
    return Partials(planes, arg, acc_p, acc_q)


def kl_partials(pol: Head, ref: Head, y, with_stats: bool, div: Divergence) -> Partials:
    """The two-head forward's partials ([11, Nv], argmax ids or None); the a plane is div's KL
    (none for the JSD); y None: no target logits."""
    return _kl_sweep(pol, ref, y, with_stats, div, False)


def kl_partials_frozen(pol: Head, ref: Head, y, with_stats: bool) -> Partials:
    """KL(p_ref || p) with a frozen policy head, one sweep: the partials and acc_p, acc_q [Nv, D]."""
    return _kl_sweep(pol, ref, y, with_stats, Divergence.FORWARD_KL, True)


def jsd_sums(pol: Head, ref: Head, lse, rlse, mix: float):
    """The generalised JSD's second pass given both heads' lse [Nv]: (jsd, KL(p || m)) [Nv], sums
    over this vocabulary."""
    hf = pol.h.to(acc_dtype(pol.h.dtype))
    rhf = ref.h.to(hf.dtype)
    lse, rlse = lse.to(hf.dtype), rlse.to(hf.dtype)
    jsd = torch.zeros(hf.shape[0], device=hf.device, dtype=hf.dtype)
    kls = torch.zeros_like(jsd)
    for v0, v1 in _chunks(pol, parts=5):         # live: lp, lq, lm, a difference, an exp
        lp = chunk_logits(pol, hf, v0, v1).sub_(lse[:, None])
        lq = chunk_logits(ref, rhf, v0, v1).sub_(rlse[:, None])
        lm = _log_mixture(lp, lq, mix)
        diff, e = torch.sub(lp, lm), lp.exp()
        kl_p = torch.einsum("ij,ij->i", e, diff)                    # sum_v p (log p - log m)
        kl_q = torch.einsum("ij,ij->i", torch.exp(lq, out=e), torch.sub(lq, lm, out=diff))
        kls += kl_p
        jsd += mix * kl_q + (1.0 - mix) * kl_p
        del lp, lq, lm, diff, e                  # before the next chunk's buffers exist
    return jsd, kls


def _onehot_add(dz, y, g, v0, v1):
    """dz[i, y_i - v0] += g_i where v0 <= y_i < v1."""
    rows = ((y >= v0) & (y < v1)).nonzero().squeeze(1)
    dz[rows, y[rows] - v0] += g[rows]


def _row_scale(g_lp, g_div, call, g_stats):
    """Each row's upstream gradient magnitude for the gradient filter (None: no filtering): dz /
    row_scale is bounded by the softmax probabilities (times a softcap/scale chain) for the log-probs'
    and the divergences' terms. A statistics' gradient (an entropy bonus, the logits' sum) has terms
    that are not, so it turns the filter off."""
    if call.grad_filter <= 0 or g_stats is not None:
        return None
    scale = torch.zeros_like(g_lp if g_lp is not None else g_div)
    if g_lp is not None:
        scale += g_lp.abs()
    if g_div is not None:
        scale += 2 * g_div.abs()
    return scale


def backward(call, pol: Head, ref: Head | None, y, saved, grads, needs: Needs, dh_dtype=None, acc=None):
    """(dH [Nv, D] or None, dW [V, D] or None, db [V] or None) of sum_i <grads_i, outputs_i> w.r.t.
    the policy head, one recompute of the logits (both heads' for a two-head call).

    saved: the forward's rows (lse, rlse, aux, stats; fusedpref._library.RowState), grads the
    upstream gradients (logp, div, stats; None where absent). dz per chunk:
        one head:       g_lp (onehot(y) - p)
        FORWARD_KL:     g (p - q)
        REVERSE_KL:     g p (log p - log q - KL)                 aux = KL
        JSD:            g (1 - mix) p (log p - log m - kls)      aux = KL(p || m)
    + g_lp (onehot(y) - p) on two-head calls with log-probs, + the statistics' gradient, then the
    cap's and scale's chain. dH accumulates in the compute dtype (returned in dh_dtype if given,
    else h's dtype). With acc (fusedpref._library.Accumulated) dW and db are added into acc.dw,
    acc.db instead of allocated (and None is returned for them)."""
    dt = acc_dtype(pol.h.dtype)
    hf = pol.h.to(dt)
    lse = saved.lse.to(dt)
    g_lp = None if grads.logp is None else grads.logp.to(dt)
    g_stats = None if grads.stats is None else grads.stats.to(dt)
    stats = None if g_stats is None else saved.stats.to(dt)
    if ref is not None:
        rhf, rlse = ref.h.to(dt), saved.rlse.to(dt)
        g = grads.div.to(dt) if grads.div is not None else torch.zeros_like(lse)
        aux = None if call.divergence == Divergence.FORWARD_KL else saved.aux.to(dt)
    elif g_lp is None:
        g_lp = torch.zeros_like(lse)

    div = call.divergence if ref is not None else None
    # log p is needed after p only by the statistics' gradient and the reverse KL / JSD terms
    keep_logp = g_stats is not None or div in (Divergence.REVERSE_KL, Divergence.JSD)

    def chunk_dz(v0, v1):
        """dz of columns v0:v1, built in place in the logits' buffers (live at once: the policy's
        logits, the chain with a cap or scale, with a reference its logits, p apart from log p
        where log p is still needed, the statistics' term)."""
        z = chunk_logits(pol, hf, v0, v1)
        chain = transform_grad(z, pol.xf)
        logp = z.sub_(lse[:, None])
        p = logp.exp() if keep_logp else logp.exp_()
        extra = None if g_stats is None else stats_grad(p, logp, g_stats, stats)
        if ref is None:
            dz = p.mul_(-g_lp[:, None])
        else:
            logq = chunk_logits(ref, rhf, v0, v1).sub_(rlse[:, None])
            if div == Divergence.FORWARD_KL:       # g (p - q) - g_lp p = p (g - g_lp) - g q
                scale = g if g_lp is None else g - g_lp
                dz = p.mul_(scale[:, None]).sub_(logq.exp_().mul_(g[:, None]))
            else:
                if div == Divergence.REVERSE_KL:   # t = log p - log q - KL, in log q's buffer
                    t = logq.neg_().add_(logp).sub_(aux[:, None])
                    gd = g
                else:                              # t = log p - log m - KL(p || m)
                    t = _log_mixture(logp, logq, call.mix).neg_().add_(logp).sub_(aux[:, None])
                    gd = (1.0 - call.mix) * g
                dz = t.mul_(p).mul_(gd[:, None])
                if g_lp is not None:
                    dz.sub_(p.mul_(g_lp[:, None]))
        if g_lp is not None:
            _onehot_add(dz, y, g_lp, v0, v1)
        if extra is not None:
            dz += extra
        return dz if chain is None else dz.mul_(chain)

    n, d = hf.shape
    vocab = pol.w.shape[0]
    row_scale = _row_scale(g_lp, None if ref is None else g, call, g_stats)
    dh = torch.zeros((n, d), dtype=dt, device=hf.device) if needs.h else None
    dw = config.empty((vocab, d), pol.w.dtype, pol.w.device) if needs.w and acc is None else None
    db = config.empty((vocab,), dt, pol.w.device) if needs.b and acc is None else None
    parts = 1 + (pol.xf != Transform()) + (ref is not None) + keep_logp + (g_stats is not None) + \
        2 * (div == Divergence.JSD)              # (the log mixture: two while it is computed)
    for v0, v1 in _chunks(pol, parts):
        dz = chunk_dz(v0, v1)
        dw_out = None if not needs.w else dw[v0:v1] if acc is None else acc.dw[v0:v1]
        db_out = None if not needs.b else db[v0:v1] if acc is None else acc.db[v0:v1]
        _products(dz, hf, pol.w[v0:v1].to(dt) if needs.h else None, needs, dh, dw_out, db_out, acc is not None,
                  call.grad_filter, row_scale)
        del dz                                   # before the next chunk's buffers exist
    return (dh.to(dh_dtype or pol.h.dtype) if needs.h else None), dw, db
