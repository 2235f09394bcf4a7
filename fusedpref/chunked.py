"""The pure-PyTorch backend: the same contract and memory bound as the Triton one, any device.

It walks the vocabulary in chunks (one rows x chunk fp32 block at a time, bounded by
FUSEDPREF_CHUNK_MB) with an online log-sum-exp, and computes in fp32 throughout (float64 for
float64 inputs, so that torch.autograd.gradcheck can be used). Functions take compacted rows,
exactly like fusedpref.ops.
"""
from __future__ import annotations

import math

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


def chunk_logits(hf, w, b, softcap, v0, v1, scale=None):
    """Logits softcap(hf w^T + b) * scale of columns v0:v1 for rows hf, in hf's (compute) dtype."""
    z = hf @ w[v0:v1].to(hf.dtype).t()
    if b is not None:
        z += b[v0:v1].to(hf.dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if scale is not None:
        z *= scale
    return z


def _chain(z, softcap, scale):
    """d z / d (h w^T + b) from the transformed logits z: scale (1 - (z / (scale softcap))^2),
    or None when it is 1."""
    if softcap is None:
        return None if scale is None else scale
    c = softcap if scale is None else scale * softcap
    d = z.div(c).square_().neg_().add_(1.0)
    return d if scale is None else d.mul_(scale)


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
            self.q = self.q * alpha * alpha + torch.einsum("ij,ij->i", p, p)
        self.l = l * alpha + p.sum(1)
        self.m = m_new
        return alpha, p

    def lse(self):
        return self.m + torch.log(self.l)

    def planes(self):
        """The partials of fusedpref/_partials.py, relative to this pass's max: [3 or 7, Nv]
        (m, l, zy, and with stats zsum, pz, amax, q) and the argmax ids [Nv] or None."""
        if not self.with_stats:
            return torch.stack([self.m, self.l, self.zy]), None
        return torch.stack([self.m, self.l, self.zy, self.zsum, self.pz, self.amax, self.q]), self.aidx

    def logp(self):
        return self.zy - self.lse()

    def stats(self):
        """[Nv, 4] = (sum of logits, entropy log l - S / l, argmax == target, log sum p^2), or None."""
        if not self.with_stats:
            return None
        return torch.stack([self.zsum, torch.log(self.l) - self.pz / self.l, (self.aidx == self.y).to(self.l),
                            torch.log(self.q) - 2.0 * torch.log(self.l)], dim=1)


def _logprob_pass(h, w, b, y, softcap, with_stats, scale):
    hf = h.to(acc_dtype(h.dtype))
    pol = _OnlinePass(h.shape[0], h.device, y, with_stats, hf.dtype)
    for v0, v1 in vocab_chunks(w.shape[0], _cols(h.shape[0], w.shape[0], h.dtype, cuda=h.is_cuda)):
        pol.add(chunk_logits(hf, w, b, softcap, v0, v1, scale), v0, v1)
    return pol


def logprob_forward(h, w, b, y, softcap, with_stats: bool, scale=None):
    pol = _logprob_pass(h, w, b, y, softcap, with_stats, scale)
    return pol.logp(), pol.lse(), pol.stats()


def logprob_partials(h, w, b, y, softcap, with_stats: bool, scale=None):
    """As fusedpref.ops.logprob_partials: ([3 or 7, Nv] partials, argmax ids [Nv] or None);
    targets outside [0, V) have no target logit."""
    return _logprob_pass(h, w, b, y, softcap, with_stats, scale).planes()


def target_direction(w, y, zy, softcap, scale, dtype):
    """k(z_y) W[y] [n, D] in dtype; 0 on rows whose target lies outside [0, V) (another shard's)."""
    own = (y >= 0) & (y < w.shape[0])
    wy = w.index_select(0, torch.where(own, y, 0)).to(dtype)
    k = _chain(zy, softcap, scale)
    wy = wy if k is None else wy * (k[:, None] if torch.is_tensor(k) else k)
    return wy if bool(own.all()) else wy * own[:, None].to(dtype)


def frozen_direction(w, y, zy, acc, total, softcap, scale):
    """d = k(z_y) W[y] - acc / total [n, D] in acc's dtype: the frozen head's dlogp / dh, from the
    softmax-weighted sum acc = sum_v exp(z_v - m) k(z_v) W[v] and total = sum_v exp(z_v - m)."""
    return target_direction(w, y, zy, softcap, scale, acc.dtype) - acc / total[:, None]


def _frozen_pass(h, w, b, y, softcap, with_stats, scale):
    """The frozen head's sweep: per chunk the logits (2 n D C FLOPs), then acc = alpha acc +
    (p k) @ W_chunk (2 n D C): (the online pass, acc relative to its max)."""
    n, dd = h.shape
    hf = h.to(acc_dtype(h.dtype))
    pol = _OnlinePass(n, h.device, y, with_stats, hf.dtype)
    acc = torch.zeros((n, dd), dtype=hf.dtype, device=h.device)
    for v0, v1 in vocab_chunks(w.shape[0], _cols(n, w.shape[0], h.dtype, cuda=h.is_cuda)):
        z = chunk_logits(hf, w, b, softcap, v0, v1, scale)
        chain = _chain(z, softcap, scale)               # before add: with stats it overwrites z
        alpha, p = pol.add(z, v0, v1)
        if chain is not None:
            p = p.mul_(chain)
        acc = torch.addmm(acc.mul_(alpha[:, None]), p, w[v0:v1].to(hf.dtype))   # (FlopCounterMode counts addmm)
    return pol, acc


def logprob_forward_frozen(h, w, b, y, softcap, with_stats: bool, scale=None):
    """As fusedpref.ops.logprob_forward_frozen: (logp, lse, stats, d [Nv, D]) from one sweep."""
    pol, acc = _frozen_pass(h, w, b, y, softcap, with_stats, scale)
    return pol.logp(), pol.lse(), pol.stats(), frozen_direction(w, y, pol.zy, acc, pol.l, softcap, scale)


def logprob_partials_frozen(h, w, b, y, softcap, with_stats: bool, scale=None):
    """As fusedpref.ops.logprob_partials_frozen: (partials, argmax ids or None, acc [Nv, D])."""
    pol, acc = _frozen_pass(h, w, b, y, softcap, with_stats, scale)
    return (*pol.planes(), acc)


def head_backward(h, w, need_h, need_w, need_b, chunk_dz, dh_dtype=None):
    """chunk_dz(hf, v0, v1) -> dz [Nv, v1 - v0] in the compute dtype; accumulates dH, dW, db in it
    (dH returned in dh_dtype if given, else h's dtype)."""
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
    return (dh.to(dh_dtype or h.dtype) if need_h else None), dw, db


def _onehot_add(dz, y, g, v0, v1):
    """dz[i, y_i - v0] += g_i where v0 <= y_i < v1."""
    rows = ((y >= v0) & (y < v1)).nonzero().squeeze(1)
    dz[rows, y[rows] - v0] += g[rows]


def logprob_backward(h, w, b, y, lse, g, softcap, need_h, need_w, need_b, scale=None, g_stats=None, stats=None,
                     dh_dtype=None):
    g = g.to(acc_dtype(h.dtype))
    if g_stats is not None:
        g_stats, stats = g_stats.to(g.dtype), stats.to(g.dtype)

    def chunk_dz(hf, v0, v1):
        z = chunk_logits(hf, w, b, softcap, v0, v1, scale)
        chain = _chain(z, softcap, scale)
        logp = z.sub_(lse[:, None])                              # in place: z is not needed after
        p = logp.exp()
        dz = p * -g[:, None]
        _onehot_add(dz, y, g, v0, v1)
        if g_stats is not None:
            dz += stats_grad(p, logp, g_stats, stats)
        return dz if chain is None else dz.mul_(chain)

    return head_backward(h, w, need_h, need_w, need_b, chunk_dz, dh_dtype)


def _log_mixture(logp, logq, beta):
    return torch.logaddexp(logp + math.log1p(-beta), logq + math.log(beta))


def kl_forward_frozen(h, w, b, rh, rw, rb, softcap, y=None, with_stats=False, *, scale=None, ref_softcap=None,
                      ref_scale=None):
    """As fusedpref.ops.kl_forward_frozen: KL(p_ref || p) and the directions of dH (d_lp, d_kl)
    accumulated in the same sweep: (kl, lse, rlse, logp, ref_logp, stats, d_lp, d_kl)."""
    return kl_forward(h, w, b, rh, rw, rb, softcap, y, with_stats, scale=scale, ref_softcap=ref_softcap,
                      ref_scale=ref_scale, frozen=True)


def _kl_sweep(h, w, b, rh, rw, rb, softcap, y, with_stats, scale, ref_softcap, ref_scale, div, frozen):
    """The two-head pass: (policy pass, reference pass, a, acc_p, acc_q), a relative to both final
    maxes (div 2: none), acc_* the frozen head's softmax-weighted sums of W rows (frozen only)."""
    n = h.shape[0]
    hf = h.to(acc_dtype(h.dtype))
    rhf = rh.to(hf.dtype)
    pol = _OnlinePass(n, h.device, y, with_stats, hf.dtype)
    ref = _OnlinePass(n, h.device, y, dtype=hf.dtype)
    a = torch.zeros(n, device=h.device, dtype=hf.dtype)
    acc_p = acc_q = None
    if frozen:   # the softmax-weighted sums of the policy's W rows under p and p_ref (div 0 only)
        acc_p = torch.zeros(h.shape, device=h.device, dtype=hf.dtype)
        acc_q = torch.zeros_like(acc_p)
    for v0, v1 in vocab_chunks(w.shape[0], _kl_cols(h, w)):
        z, r = _both_logits(hf, w, b, rhf, rw, rb, softcap, scale, ref_softcap, ref_scale, v0, v1)
        if div == 2:
            ref.add(r, v0, v1)
            pol.add(z, v0, v1)
            continue
        chain = _chain(z, softcap, scale) if frozen else None    # before pol.add overwrites z
        # KL(first || second) relative to both running maxes; move a to the new maxes (nothing
        # to move before the first chunk), then add this chunk
        first, x, second, u = (ref, r, pol, z) if div == 0 else (pol, z, ref, r)
        m1_old, m2_old, l1_old = first.m, second.m, first.l
        m1_new, m2_new = torch.maximum(m1_old, x.amax(1)), torch.maximum(m2_old, u.amax(1))
        diff = (x - m1_new[:, None]).sub_(u).add_(m2_new[:, None])       # (x - m_x) - (u - m_u)
        alpha_r, p_r = ref.add(r, v0, v1)
        alpha_z, p_z = pol.add(z, v0, v1)            # after diff: with stats it overwrites z
        alpha, p1 = (alpha_r, p_r) if div == 0 else (alpha_z, p_z)
        shift = torch.where(l1_old > 0, (m1_old - m1_new) - (m2_old - m2_new), 0.0)
        a = alpha * (a + l1_old * shift) + torch.einsum("ij,ij->i", p1, diff)
        if frozen:
            wc = w[v0:v1].to(hf.dtype)
            acc_p = torch.addmm(acc_p.mul_(alpha_z[:, None]), p_z if chain is None else p_z * chain, wc)
            acc_q = torch.addmm(acc_q.mul_(alpha_r[:, None]), p_r if chain is None else p_r * chain, wc)
    return pol, ref, a, acc_p, acc_q


def _kl_cols(h, w):
    return _cols(h.shape[0], w.shape[0], h.dtype, parts=2, cuda=h.is_cuda)    # two heads' chunks live at once


def _both_logits(hf, w, b, rhf, rw, rb, softcap, scale, ref_softcap, ref_scale, v0, v1):
    return (chunk_logits(hf, w, b, softcap, v0, v1, scale),
            chunk_logits(rhf, rw, rb, ref_softcap, v0, v1, ref_scale))


def kl_partials(h, w, b, rh, rw, rb, softcap, y=None, with_stats=False, *, scale=None, ref_softcap=None,
                ref_scale=None, div=0):
    """As fusedpref.ops.kl_partials: ([11, Nv] partials, argmax ids [Nv] or None)."""
    pol, ref, a, _, _ = _kl_sweep(h, w, b, rh, rw, rb, softcap, y, with_stats, scale, ref_softcap, ref_scale, div,
                                  False)
    return _kl_planes(pol, ref, a, y, with_stats)


def kl_partials_frozen(h, w, b, rh, rw, rb, softcap, y=None, with_stats=False, *, scale=None, ref_softcap=None,
                       ref_scale=None):
    """As fusedpref.ops.kl_partials_frozen: (partials, argmax ids or None, acc_p, acc_q [Nv, D])."""
    pol, ref, a, acc_p, acc_q = _kl_sweep(h, w, b, rh, rw, rb, softcap, y, with_stats, scale, ref_softcap,
                                          ref_scale, 0, True)
    return (*_kl_planes(pol, ref, a, y, with_stats), acc_p, acc_q)


def _kl_planes(pol, ref, a, y, with_stats):
    planes, arg = pol.planes()
    if not with_stats:
        planes = torch.cat([planes, planes.new_zeros((4, planes.shape[1]))])
    # (without targets both passes' target logits stayed 0)
    return torch.cat([planes, torch.stack([ref.m, ref.l, a, ref.zy])]), arg


def jsd_sums(h, w, b, rh, rw, rb, lse, rlse, softcap, *, scale=None, ref_softcap=None, ref_scale=None, beta=0.5):
    """As fusedpref.ops.jsd_sums: (jsd, KL(p || m)) [Nv] over w's vocabulary, given both lse."""
    hf = h.to(acc_dtype(h.dtype))
    rhf = rh.to(hf.dtype)
    lse, rlse = lse.to(hf.dtype), rlse.to(hf.dtype)
    jsd = torch.zeros(h.shape[0], device=h.device, dtype=hf.dtype)
    kls = torch.zeros_like(jsd)
    for v0, v1 in vocab_chunks(w.shape[0], _kl_cols(h, w)):
        z, r = _both_logits(hf, w, b, rhf, rw, rb, softcap, scale, ref_softcap, ref_scale, v0, v1)
        lp, lq = z.sub_(lse[:, None]), r.sub_(rlse[:, None])
        lm = _log_mixture(lp, lq, beta)
        kl_p = (lp.exp() * (lp - lm)).sum(1)
        kls += kl_p
        jsd += beta * (lq.exp() * (lq - lm)).sum(1) + (1.0 - beta) * kl_p
    return jsd, kls


def kl_forward(h, w, b, rh, rw, rb, softcap, y=None, with_stats=False, *, scale=None, ref_softcap=None,
               ref_scale=None, div=0, beta=0.5, frozen=False):
    """As fusedpref.ops.kl_forward: (div, lse, rlse, logp, ref_logp, stats, aux).

    The KL is E[(r - m_r) - (z - m_z)] - log l_r + log l_z (or the reverse), with the
    expectation accumulated relative to both running maxes (a = sum_v exp(r - m_r)
    ((r - m_r) - (z - m_z))), so that nothing of the size of the logits cancels at the end
    (|z| ~ 1e3 keeps fp32 accuracy). The JSD (div 2) takes a second pass, given both lse."""
    pol, ref, a, acc_p, acc_q = _kl_sweep(h, w, b, rh, rw, rb, softcap, y, with_stats, scale, ref_softcap,
                                          ref_scale, div, frozen)
    lse, rlse = pol.lse(), ref.lse()
    logp_on = y is not None
    logp, ref_logp = (pol.logp(), ref.logp()) if logp_on else (None, None)
    if div == 2:
        jsd, kls = jsd_sums(h, w, b, rh, rw, rb, lse, rlse, softcap, scale=scale, ref_softcap=ref_softcap,
                            ref_scale=ref_scale, beta=beta)
        return jsd, lse, rlse, logp, ref_logp, pol.stats(), kls
    if div == 0:
        kl = a / ref.l - torch.log(ref.l) + torch.log(pol.l)
        if frozen:
            d_kl = acc_p / pol.l[:, None] - acc_q / ref.l[:, None]
            d_lp = frozen_direction(w, y, pol.zy, acc_p, pol.l, softcap, scale) if logp_on else None
            return kl, lse, rlse, logp, ref_logp, pol.stats(), d_lp, d_kl
    else:
        kl = a / pol.l - torch.log(pol.l) + torch.log(ref.l)
    return kl, lse, rlse, logp, ref_logp, pol.stats(), (kl if div == 1 else None)


def kl_backward(h, w, b, rh, rw, rb, lse, rlse, g, softcap, need_h, need_w, need_b, y=None, g_lp=None, *,
                scale=None, ref_softcap=None, ref_scale=None, div=0, beta=0.5, aux=None, g_stats=None,
                stats=None, dh_dtype=None):
    """Gradients of sum g * div (+ sum g_lp * logp with targets y; + the stats' upstream
    gradient) w.r.t. the policy head."""
    g = g.to(acc_dtype(h.dtype))
    rhf = rh.to(g.dtype)
    if g_lp is not None:
        g_lp = g_lp.to(g.dtype)
    if aux is not None:
        aux = aux.to(g.dtype)
    if g_stats is not None:
        g_stats, stats = g_stats.to(g.dtype), stats.to(g.dtype)

    def chunk_dz(hf, v0, v1):
        z = chunk_logits(hf, w, b, softcap, v0, v1, scale)
        r = chunk_logits(rhf, rw, rb, ref_softcap, v0, v1, ref_scale)
        chain = _chain(z, softcap, scale)
        logp, logq = z.sub_(lse[:, None]), r.sub_(rlse[:, None])
        p = logp.exp()
        if div == 0:
            dz = (p - logq.exp_()).mul_(g[:, None])
        elif div == 1:
            dz = p * (logp - logq - aux[:, None]) * g[:, None]
        else:
            dz = p * (logp - _log_mixture(logp, logq, beta) - aux[:, None]) * ((1.0 - beta) * g)[:, None]
        if g_lp is not None:
            dz -= p * g_lp[:, None]
            _onehot_add(dz, y, g_lp, v0, v1)
        if g_stats is not None:
            dz += stats_grad(p, logp, g_stats, stats)
        return dz if chain is None else dz.mul_(chain)

    return head_backward(h, w, need_h, need_w, need_b, chunk_dz, dh_dtype)
