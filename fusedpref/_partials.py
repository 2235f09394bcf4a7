"""Per-row partials of the online log-softmax, how they combine, and the rest of the maths both
backends share (backend-neutral, pure torch; neither backend is imported here).

A forward pass over part of the vocabulary (a kernel's split, the torch backend's whole sweep,
one rank's shard) leaves, per row and relative to that part's own maxes, the planes

    m_z, l_z     max of the policy logits z and sum exp(z - m_z)
    zy           the target logit (0 where the target lies elsewhere)
    zsum, pz, amax, q   (with statistics) sum z, sum exp(z - m_z)(z - m_z), max z, sum exp(2(z - m_z))
    m_r, l_r, a, ry     (two heads) the reference's max and sum, the KL's a (kernels/kl.py), r[y]

in part[plane, part_index, row] (PLANES gives the order; 0..6 are the one-head layout). `merge`
folds any number of parts into one with the same meaning (relative to the overall maxes); so the
parts of one kernel launch and the shards of a vocabulary-parallel group combine by the same rule,
and `finish_logprob` / `finish_kl` turn one merged part into the per-row results.

A frozen head's one-pass forward (README "Frozen head") also leaves acc = sum_v exp(z_v - m) k(z_v) W[v]
[n, D] relative to its part's max m; `expectation` moves it to the merged max and normalises it,
and `target_direction` is the other term of dlogp/dh.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._spec import Divergence, Transform

PLANES = {"m_z": 0, "l_z": 1, "zy": 2, "zsum": 3, "pz": 4, "amax": 5, "q": 6, "m_r": 7, "l_r": 8, "a": 9,
          "ry": 10}
ONE_HEAD = 7     # planes of a one-head pass with statistics (3 without: m_z, l_z, zy)


class Partials(NamedTuple):
    """What a backend's forward leaves for its part of the vocabulary: planes [P, n] (PLANES),
    argmax ids [n] (local to the part) or None, and a frozen head's weighted sums of the policy's
    W rows under p (acc_p) and under the reference's q (acc_q), [n, D] fp32, or None."""
    planes: torch.Tensor
    arg: Optional[torch.Tensor] = None
    acc_p: Optional[torch.Tensor] = None
    acc_q: Optional[torch.Tensor] = None


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The compute dtype of a head call: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_partials(n: int, planes: int, with_stats: bool, acc_width: int, two_heads: bool, dtype, device):
    """The partials of a part of the vocabulary that holds no column (an empty shard): no logits
    (maxes -inf, sums 0), and zero accumulators of width acc_width (0: none)."""
    part = torch.zeros((planes, n), dtype=dtype, device=device)
    part[PLANES["m_z"]] = float("-inf")
    if with_stats:
        part[PLANES["amax"]] = float("-inf")
    if planes == len(PLANES):
        part[PLANES["m_r"]] = float("-inf")
    acc = (lambda: torch.zeros((n, acc_width), dtype=dtype, device=device)) if acc_width else (lambda: None)
    return Partials(part, torch.zeros(n, dtype=torch.int64, device=device) if with_stats else None, acc(),
                    acc() if two_heads else None)


def transform_grad(z: torch.Tensor, xf: Transform):
    """d z / d (h W^T + b) of a head's transformed logits z: scale (1 - (z / (scale softcap))^2),
    the scale alone without a cap, or None when it is 1."""
    softcap, scale = xf.softcap, xf.scale
    if softcap is None:
        return None if scale is None else scale
    c = softcap if scale is None else scale * softcap
    d = z.div(c).square_().neg_().add_(1.0)
    return d if scale is None else d.mul_(scale)


def target_direction(w: torch.Tensor, y: torch.Tensor, zy: torch.Tensor, xf: Transform, dtype) -> torch.Tensor:
    """k(z_y) W[y] [n, D] in dtype (k = transform_grad); 0 on rows whose target lies outside
    [0, V) (another shard's)."""
    own = (y >= 0) & (y < w.shape[0])
    wy = w.index_select(0, torch.where(own, y, 0)).to(dtype)
    k = transform_grad(zy, xf)
    wy = wy if k is None else wy * (k[:, None] if torch.is_tensor(k) else k)
    return wy if bool(own.all()) else wy * own[:, None].to(dtype)


def expectation(acc: torch.Tensor, part_max: torch.Tensor, merged_max: torch.Tensor,
                total: torch.Tensor) -> torch.Tensor:
    """A part's share of E[k W] = exp(m_part - M) acc / L, from its acc (relative to its own max)
    and the merged max M and sum L; over the parts of a vocabulary the shares add up to E[k W]."""
    return acc * torch.exp(part_max - merged_max)[:, None].to(acc.dtype) / total[:, None].to(acc.dtype)


def _rescale(m, l):
    """(overall max [n], per-part factors exp(m - M) [parts, n], overall sum relative to M)."""
    big = m.amax(0)
    scale = torch.exp(m - big)
    return big, scale, (l * scale).sum(0)


def _moved(m, big, l):
    """(m - M) l, 0 where a part saw nothing (l = 0, m = -inf)."""
    return torch.where(l > 0, m - big, 0.0) * l


def merge(part: torch.Tensor, arg: torch.Tensor | None, div: Divergence | None = None):
    """Folds part [planes, parts, n] (and the statistics' argmax ids arg [parts, n], global ids)
    into one part: (merged [planes, n], arg [n] or None). Planes: the first 3 or 7 (one head), or
    all 11 of PLANES with div (the a plane is div's KL; none for the JSD). The statistics planes
    are merged only with arg."""
    planes = part.shape[0]
    out = torch.empty(part.shape[0], part.shape[2], dtype=part.dtype, device=part.device)
    m_z, l_z = part[PLANES["m_z"]], part[PLANES["l_z"]]
    big_z, zscale, out[PLANES["l_z"]] = _rescale(m_z, l_z)
    out[PLANES["m_z"]] = big_z
    out[PLANES["zy"]] = part[PLANES["zy"]].sum(0)
    merged_arg = None
    if planes > 3:
        out[3:ONE_HEAD] = 0.0       # (statistics planes not asked for: left unwritten by the kernels)
    if arg is not None:
        out[PLANES["zsum"]] = part[PLANES["zsum"]].sum(0)
        out[PLANES["pz"]] = (zscale * (part[PLANES["pz"]] + _moved(m_z, big_z, l_z))).sum(0)
        amax = part[PLANES["amax"]]
        best = amax.argmax(0, keepdim=True)              # the first part holding the max
        out[PLANES["amax"]] = amax.gather(0, best).squeeze(0)
        out[PLANES["q"]] = (part[PLANES["q"]] * zscale * zscale).sum(0)
        if arg is not None:
            merged_arg = arg.gather(0, best).squeeze(0)
    if planes == len(PLANES):
        m_r, l_r = part[PLANES["m_r"]], part[PLANES["l_r"]]
        big_r, rscale, out[PLANES["l_r"]] = _rescale(m_r, l_r)
        out[PLANES["m_r"]] = big_r
        out[PLANES["ry"]] = part[PLANES["ry"]].sum(0)
        a = part[PLANES["a"]]
        if div == Divergence.JSD:
            out[PLANES["a"]] = 0.0
        else:
            # each part's a is relative to its own maxes: move it to the overall ones
            shift = torch.where(l_r > 0, m_r - big_r, 0.0) - torch.where(l_z > 0, m_z - big_z, 0.0)
            if div == Divergence.FORWARD_KL:
                out[PLANES["a"]] = (rscale * (a + l_r * shift)).sum(0)
            else:
                out[PLANES["a"]] = (zscale * (a - l_z * shift)).sum(0)
    return out, merged_arg


def finish_logprob(merged: torch.Tensor, arg: torch.Tensor | None, y: torch.Tensor):
    """(logp [n], lse [n], stats [n, 4] or None) of one merged part; stats (with arg) = (sum of
    logits, entropy, argmax == y, log sum_v p^2)."""
    m, l = merged[PLANES["m_z"]], merged[PLANES["l_z"]]
    log_l = torch.log(l)
    lse = m + log_l
    logp = merged[PLANES["zy"]] - lse
    stats = None
    if arg is not None:
        entropy = log_l - merged[PLANES["pz"]] / l
        hit = (arg.long() == y).to(merged.dtype)
        log_sq = torch.log(merged[PLANES["q"]]) - 2.0 * log_l
        stats = torch.stack([merged[PLANES["zsum"]], entropy, hit, log_sq], dim=1)
    return logp, lse, stats


def finish_kl(merged: torch.Tensor, arg: torch.Tensor | None, y: torch.Tensor | None, div: Divergence):
    """dict of div (None for the JSD, which takes a second pass), lse, rlse, logp, ref_logp, stats
    (None where not asked for: y None means no target logits), aux (div 1: the KL) and ztotal,
    rtotal (the sums of exp relative to the overall maxes)."""
    out = dict(logp=None, stats=None, ref_logp=None, aux=None, div=None)
    if y is not None:
        out["logp"], out["lse"], out["stats"] = finish_logprob(merged[:ONE_HEAD], arg, y)
    else:
        out["lse"] = merged[PLANES["m_z"]] + torch.log(merged[PLANES["l_z"]])
    ztotal, rtotal = merged[PLANES["l_z"]], merged[PLANES["l_r"]]
    out["rlse"] = merged[PLANES["m_r"]] + torch.log(rtotal)
    out["ztotal"], out["rtotal"] = ztotal, rtotal
    if y is not None:
        out["ref_logp"] = merged[PLANES["ry"]] - out["rlse"]
    if div == Divergence.JSD:
        return out
    a = merged[PLANES["a"]]
    # KL(ref || pol) = a / l_r - log l_r + log l_z, KL(pol || ref) = a / l_z - log l_z + log l_r
    if div == Divergence.FORWARD_KL:
        out["div"] = a / rtotal - torch.log(rtotal) + torch.log(ztotal)
    else:
        out["div"] = out["aux"] = a / ztotal - torch.log(ztotal) + torch.log(rtotal)
    return out
