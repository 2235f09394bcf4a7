"""The pure-PyTorch backend: the same contract and memory bound as the Triton one, any device.

It walks the vocabulary in chunks (one rows x chunk fp32 block at a time, bounded by
FUSEDPREF_CHUNK_MB) with an online log-sum-exp, and computes in fp32 throughout (float64 for
float64 inputs, so that torch.autograd.gradcheck can be used). Functions take compacted rows,
exactly like fusedpref.ops.
"""
from __future__ import annotations

import torch

from . import config
from ._chunks import vocab_chunk_cols, vocab_chunks

def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The compute dtype: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cols(n, vocab, dtype, parts=1, cuda=False):
    """Chunk columns for `parts` live rows x cols buffers of the compute dtype (default budget
    8 MiB on the CPU, 256 MiB on CUDA, where small chunks would be many small matmuls)."""
    return max(1, vocab_chunk_cols(n, vocab, acc_dtype(dtype).itemsize, default_mb=256 if cuda else 8) // parts)


def chunk_logits(hf, w, b, softcap, v0, v1):
    """Logits of columns v0:v1 for rows hf, in hf's (compute) dtype."""
    z = hf @ w[v0:v1].to(hf.dtype).t()
    if b is not None:
        z += b[v0:v1].to(hf.dtype)
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
        return torch.stack([self.zsum, torch.log(self.l) - self.pz / self.l, (self.aidx == self.y).to(self.l)],
                           dim=1)


def logprob_forward(h, w, b, y, softcap, with_stats: bool):
    hf = h.to(acc_dtype(h.dtype))
    pol = _OnlinePass(h.shape[0], h.device, y, with_stats, hf.dtype)
    for v0, v1 in vocab_chunks(w.shape[0], _cols(h.shape[0], w.shape[0], h.dtype, cuda=h.is_cuda)):
        pol.add(chunk_logits(hf, w, b, softcap, v0, v1), v0, v1)
    return pol.logp(), pol.lse(), pol.stats()


def head_backward(h, w, need_h, need_w, need_b, chunk_dz):
    """chunk_dz(hf, v0, v1) -> dz [Nv, v1 - v0] in the compute dtype; accumulates dH, dW, db in it."""
    n, d = h.shape
    vocab = w.shape[0]
    hf = h.to(acc_dtype(h.dtype))
    dh = torch.zeros((n, d), dtype=hf.dtype, device=h.device) if need_h else None
    dw = config.empty((vocab, d), w.dtype, w.device) if need_w else None
    db = config.empty((vocab,), hf.dtype, w.device) if need_b else None
    for v0, v1 in vocab_chunks(vocab, _cols(n, vocab, h.dtype, cuda=h.is_cuda)):
        dz = chunk_dz(hf, v0, v1)
        if need_w:
            dw[v0:v1] = dz.t() @ hf
        if need_b:
            db[v0:v1] = dz.sum(0)
        if need_h:
            dh += dz @ w[v0:v1].to(hf.dtype)
    return (dh.to(h.dtype) if need_h else None), dw, db


def logprob_backward(h, w, b, y, lse, g, softcap, need_h, need_w, need_b):
    g = g.to(acc_dtype(h.dtype))

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
    """As fusedpref.ops.kl_forward: (kl, lse, rlse, logp, ref_logp, stats).

    KL = E_ref[(r - m_r) - (z - m_z)] - log l_r + log l_z, with the expectation accumulated
    relative to both running maxes (a = sum_v exp(r - m_r) ((r - m_r) - (z - m_z))), so that
    nothing of the size of the logits cancels at the end (|z| ~ 1e3 keeps fp32 accuracy)."""
    n = h.shape[0]
    hf = h.to(acc_dtype(h.dtype))
    rhf = rh.to(hf.dtype)
    pol = _OnlinePass(n, h.device, y, with_stats, hf.dtype)
    ref = _OnlinePass(n, h.device, y, dtype=hf.dtype)
    a = torch.zeros(n, device=h.device, dtype=hf.dtype)
    # two heads' chunks live at once: half the columns per chunk
    for v0, v1 in vocab_chunks(w.shape[0], _cols(n, w.shape[0], h.dtype, parts=2, cuda=h.is_cuda)):
        z = chunk_logits(hf, w, b, softcap, v0, v1)
        r = chunk_logits(rhf, rw, rb, softcap, v0, v1)
        mr_old, mz_old, lr_old = ref.m, pol.m, ref.l
        mz_new = torch.maximum(mz_old, z.amax(1))
        alpha, pr = ref.add(r, v0, v1)
        # move a to the new maxes (nothing to move before the first chunk), then add this chunk
        shift = torch.where(lr_old > 0, (mr_old - ref.m) - (mz_old - mz_new), 0.0)
        diff = r.sub_(ref.m[:, None]).sub_(z).add_(mz_new[:, None])      # (r - m_r) - (z - m_z), in place
        a = alpha * (a + lr_old * shift) + torch.einsum("ij,ij->i", pr, diff)
        pol.add(z, v0, v1)                           # after the KL term: it may overwrite z
    lse, rlse = pol.lse(), ref.lse()
    logp_on = y is not None
    kl = a / ref.l - torch.log(ref.l) + torch.log(pol.l)
    return (kl, lse, rlse, pol.logp() if logp_on else None, ref.logp() if logp_on else None, pol.stats())


def kl_backward(h, w, b, rh, rw, rb, lse, rlse, g, softcap, need_h, need_w, need_b, y=None, g_lp=None):
    """Gradients of sum g * KL (+ sum g_lp * logp with targets y) w.r.t. the policy head."""
    g = g.to(acc_dtype(h.dtype))
    rhf = rh.to(g.dtype)
    if g_lp is not None:
        g_lp = g_lp.to(g.dtype)

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
