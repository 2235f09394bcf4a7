"""The pure-PyTorch backend: the same contract and memory bound as the Triton one, any device.

It walks the vocabulary in chunks (one rows x chunk fp32 block at a time, bounded by
FUSEDPREF_CHUNK_MB) with an online log-sum-exp, and computes in fp32 throughout. Functions
take compacted rows, exactly like fusedpref.ops.
"""
from __future__ import annotations

import torch

from . import config
from ._chunks import vocab_chunk_cols, vocab_chunks

_F32 = 4


def chunk_logits(hf, w, b, softcap, v0, v1):
    """fp32 logits of columns v0:v1 for fp32 rows hf."""
    z = hf @ w[v0:v1].float().t()
    if b is not None:
        z += b[v0:v1].float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _target_in_chunk(z, y, v0, v1):
    """z[i, y_i - v0] where v0 <= y_i < v1, else 0."""
    inside = (y >= v0) & (y < v1)
    local = (y - v0).clamp(0, v1 - v0 - 1)
    return torch.where(inside, z.gather(1, local[:, None]).squeeze(1), 0.0)


def _shifted_pz(pz, alpha, m, m_new, l, p, z):
    """Online update of sum_v exp(z - m) (z - m) (the entropy's E_p[z], kept relative to the
    running max so that it does not cancel against lse in fp32): rescale to the new max, then
    add this chunk. l is the running sum *before* this chunk; z is overwritten."""
    carried = torch.where(l > 0, m - m_new, 0.0) * l       # 0 before the first chunk (m = -inf)
    return alpha * (pz + carried) + torch.einsum("ij,ij->i", p, z.sub_(m_new[:, None]))


def logprob_forward(h, w, b, y, softcap, with_stats: bool):
    n = h.shape[0]
    vocab = w.shape[0]
    hf = h.float()
    m = torch.full((n,), float("-inf"), device=h.device)
    l = torch.zeros(n, device=h.device)
    zy = torch.zeros(n, device=h.device)
    if with_stats:
        zsum, pz = torch.zeros(n, device=h.device), torch.zeros(n, device=h.device)
        amax = torch.full((n,), float("-inf"), device=h.device)
        aidx = torch.zeros(n, dtype=torch.long, device=h.device)
    for v0, v1 in vocab_chunks(vocab, vocab_chunk_cols(n, vocab, _F32, default_mb=8)):
        z = chunk_logits(hf, w, b, softcap, v0, v1)
        cmax, carg = z.max(dim=1)
        m_new = torch.maximum(m, cmax)
        alpha = torch.exp(m - m_new)
        zy += _target_in_chunk(z, y, v0, v1)
        if with_stats:
            zsum += z.sum(1)
        p = z.sub(m_new[:, None]).exp_()                  # one chunk-sized temporary
        if with_stats:
            pz = _shifted_pz(pz, alpha, m, m_new, l, p, z)
        l = l * alpha + p.sum(1)
        if with_stats:
            better = cmax > amax
            aidx = torch.where(better, carg + v0, aidx)
            amax = torch.where(better, cmax, amax)
        m = m_new
    lse = m + torch.log(l)
    stats = None
    if with_stats:
        stats = torch.stack([zsum, torch.log(l) - pz / l, (aidx == y).float()], dim=1)
    return zy - lse, lse, stats


def head_backward(h, w, need_h, need_w, need_b, chunk_dz):
    """chunk_dz(hf, v0, v1) -> fp32 dz [Nv, v1 - v0]; accumulates dH, dW, db in fp32."""
    n, d = h.shape
    vocab = w.shape[0]
    hf = h.float()
    dh = torch.zeros((n, d), dtype=torch.float32, device=h.device) if need_h else None
    dw = config.empty((vocab, d), w.dtype, w.device) if need_w else None
    db = config.empty((vocab,), torch.float32, w.device) if need_b else None
    for v0, v1 in vocab_chunks(vocab, vocab_chunk_cols(n, vocab, _F32, default_mb=8)):
        dz = chunk_dz(hf, v0, v1)
        if need_w:
            dw[v0:v1] = dz.t() @ hf
        if need_b:
            db[v0:v1] = dz.sum(0)
        if need_h:
            dh += dz @ w[v0:v1].float()
    return (dh.to(h.dtype) if need_h else None), dw, db


def logprob_backward(h, w, b, y, lse, g, softcap, need_h, need_w, need_b):
    g = g.float()

    def chunk_dz(hf, v0, v1):
        z = chunk_logits(hf, w, b, softcap, v0, v1)
        inside = (y >= v0) & (y < v1)
        rows = inside.nonzero().squeeze(1)
        cols = y[rows] - v0
        if softcap is not None:
            cap = z.div(softcap).square_().neg_().add_(1.0)      # 1 - (z / softcap)^2
        dz = z.sub_(lse[:, None]).exp_().mul_(-g[:, None])       # in place: z is not needed after
        dz[rows, cols] += g[rows]
        if softcap is not None:
            dz.mul_(cap)
        return dz

    return head_backward(h, w, need_h, need_w, need_b, chunk_dz)


def kl_forward(h, w, b, rh, rw, rb, softcap, y=None, with_stats=False):
    """As fusedpref.ops.kl_forward: (kl, lse, rlse, logp, ref_logp, stats)."""
    n = h.shape[0]
    vocab = w.shape[0]
    logp_on = y is not None
    if with_stats and not logp_on:
        raise ValueError("with_stats needs the targets y")
    hf, rhf = h.float(), rh.float()
    inf = torch.full((n,), float("-inf"), device=h.device)
    m_z, l_z, m_r, l_r, a = inf, torch.zeros_like(inf), inf, torch.zeros_like(inf), torch.zeros_like(inf)
    zy, ry = torch.zeros_like(l_z), torch.zeros_like(l_z)
    if with_stats:
        zsum, pz, amax = torch.zeros_like(l_z), torch.zeros_like(l_z), inf.clone()
        aidx = torch.zeros(n, dtype=torch.long, device=h.device)
    # two heads' chunks live at once: half the columns per chunk
    for v0, v1 in vocab_chunks(vocab, max(1, vocab_chunk_cols(n, vocab, _F32, default_mb=8) // 2)):
        z = chunk_logits(hf, w, b, softcap, v0, v1)
        r = chunk_logits(rhf, rw, rb, softcap, v0, v1)
        if logp_on:
            zy += _target_in_chunk(z, y, v0, v1)
            ry += _target_in_chunk(r, y, v0, v1)
        cmax, carg = z.max(dim=1)
        mz = torch.maximum(m_z, cmax)
        alpha_z = torch.exp(m_z - mz)
        p = torch.exp(z - mz[:, None])
        if with_stats:
            zsum += z.sum(1)
            pz = _shifted_pz(pz, alpha_z, m_z, mz, l_z, p, z.clone())
        l_z = l_z * alpha_z + p.sum(1)
        if with_stats:
            better = cmax > amax
            aidx = torch.where(better, carg + v0, aidx)
            amax = torch.where(better, cmax, amax)
        m_z = mz
        mr = torch.maximum(m_r, r.amax(1))
        alpha = torch.exp(m_r - mr)
        pr = torch.exp(r - mr[:, None])
        l_r = l_r * alpha + pr.sum(1)
        a = a * alpha + torch.einsum("ij,ij->i", pr, r.sub_(z))
        m_r = mr
    lse, rlse = m_z + torch.log(l_z), m_r + torch.log(l_r)
    stats = torch.stack([zsum, torch.log(l_z) - pz / l_z, (aidx == y).float()], dim=1) if with_stats else None
    return (a / l_r - rlse + lse, lse, rlse, zy - lse if logp_on else None, ry - rlse if logp_on else None,
            stats)


def kl_backward(h, w, b, rh, rw, rb, lse, rlse, g, softcap, need_h, need_w, need_b, y=None, g_lp=None):
    """Gradients of sum g * KL (+ sum g_lp * logp with targets y) w.r.t. the policy head."""
    g = g.float()
    rhf = rh.float()
    if g_lp is not None:
        g_lp = g_lp.float()

    def chunk_dz(hf, v0, v1):
        z = chunk_logits(hf, w, b, softcap, v0, v1)
        r = chunk_logits(rhf, rw, rb, softcap, v0, v1)
        if softcap is not None:
            cap = z.div(softcap).square_().neg_().add_(1.0)
        p = z.sub_(lse[:, None]).exp_()
        if g_lp is None:
            dz = p.sub_(r.sub_(rlse[:, None]).exp_()).mul_(g[:, None])
        else:   # g (p - p_ref) + g_lp (onehot - p) = (g - g_lp) p - g p_ref + g_lp onehot
            dz = p.mul_((g - g_lp)[:, None]).sub_(r.sub_(rlse[:, None]).exp_().mul_(g[:, None]))
            inside = (y >= v0) & (y < v1)
            rows = inside.nonzero().squeeze(1)
            dz[rows, y[rows] - v0] += g_lp[rows]
        if softcap is not None:
            dz.mul_(cap)
        return dz

    return head_backward(h, w, need_h, need_w, need_b, chunk_dz)
