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


class _OnlinePass:
    """One head's online pass over vocabulary chunks, in fp32: the log-sum-exp, with targets y the
    target logit, and with stats the metric statistics (sum of logits, the entropy's E_p[z] kept
    relative to the running max so that it does not cancel against lse, first argmax)."""

    def __init__(self, n, device, y=None, with_stats=False):
        if with_stats and y is None:
            raise ValueError("with_stats needs the targets y")
        self.y, self.with_stats = y, with_stats
        self.m = torch.full((n,), float("-inf"), device=device)
        self.l = torch.zeros(n, device=device)
        self.zy = torch.zeros(n, device=device)
        if with_stats:
            self.zsum, self.pz = torch.zeros(n, device=device), torch.zeros(n, device=device)
            self.amax = torch.full((n,), float("-inf"), device=device)
            self.aidx = torch.zeros(n, dtype=torch.long, device=device)

    def add(self, z, v0, v1):
        """Folds in the logits z of columns v0:v1 (overwritten with stats); returns the rescaling
        factor of the running sum and this chunk's exp(z - new max)."""
        if self.with_stats:
            cmax, carg = z.max(dim=1)
        else:
            cmax = z.amax(1)
        m, l = self.m, self.l
        m_new = torch.maximum(m, cmax)
        alpha = torch.exp(m - m_new)
        if self.y is not None:
            self.zy += _target_in_chunk(z, self.y, v0, v1)
        p = z.sub(m_new[:, None]).exp_()                  # one chunk-sized temporary
        if self.with_stats:
            self.zsum += z.sum(1)
            # sum exp(z - m)(z - m): rescale to the new max (0 before the first chunk), add this chunk
            carried = torch.where(l > 0, m - m_new, 0.0) * l
            self.pz = alpha * (self.pz + carried) + torch.einsum("ij,ij->i", p, z.sub_(m_new[:, None]))
            better = cmax > self.amax
            self.aidx = torch.where(better, carg + v0, self.aidx)
            self.amax = torch.where(better, cmax, self.amax)
        self.l = l * alpha + p.sum(1)
        self.m = m_new
        return alpha, p

    def lse(self):
        return self.m + torch.log(self.l)

    def logp(self):
        return self.zy - self.lse()

    def stats(self):
        """[Nv, 3] = (sum of logits, entropy log l - S / l, argmax == target), or None."""
        if not self.with_stats:
            return None
        return torch.stack([self.zsum, torch.log(self.l) - self.pz / self.l, (self.aidx == self.y).float()],
                           dim=1)


def logprob_forward(h, w, b, y, softcap, with_stats: bool):
    hf = h.float()
    pol = _OnlinePass(h.shape[0], h.device, y, with_stats)
    for v0, v1 in vocab_chunks(w.shape[0], vocab_chunk_cols(h.shape[0], w.shape[0], _F32, default_mb=8)):
        pol.add(chunk_logits(hf, w, b, softcap, v0, v1), v0, v1)
    return pol.logp(), pol.lse(), pol.stats()


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
    hf, rhf = h.float(), rh.float()
    pol = _OnlinePass(n, h.device, y, with_stats)
    ref = _OnlinePass(n, h.device, y)
    a = torch.zeros(n, device=h.device)            # sum exp(r - m_r) (r - z), rescaled with l_r
    # two heads' chunks live at once: half the columns per chunk
    for v0, v1 in vocab_chunks(w.shape[0], max(1, vocab_chunk_cols(n, w.shape[0], _F32, default_mb=8) // 2)):
        z = chunk_logits(hf, w, b, softcap, v0, v1)
        r = chunk_logits(rhf, rw, rb, softcap, v0, v1)
        alpha, pr = ref.add(r, v0, v1)
        a = a * alpha + torch.einsum("ij,ij->i", pr, r.sub_(z))
        pol.add(z, v0, v1)                           # after the KL term: it may overwrite z
    lse, rlse = pol.lse(), ref.lse()
    logp_on = y is not None
    return (a / ref.l - rlse + lse, lse, rlse, pol.logp() if logp_on else None,
            ref.logp() if logp_on else None, pol.stats())


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
