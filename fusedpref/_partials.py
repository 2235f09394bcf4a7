"""Per-row partials of the online log-softmax, and how they combine (backend-neutral, pure torch).

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
"""
from __future__ import annotations

import torch

PLANES = {"m_z": 0, "l_z": 1, "zy": 2, "zsum": 3, "pz": 4, "amax": 5, "q": 6, "m_r": 7, "l_r": 8, "a": 9,
          "ry": 10}
ONE_HEAD = 7     # planes of a one-head pass with statistics (3 without: m_z, l_z, zy)


def _rescale(m, l):
    """(overall max [n], per-part factors exp(m - M) [parts, n], overall sum relative to M)."""
    big = m.amax(0)
    scale = torch.exp(m - big)
    return big, scale, (l * scale).sum(0)


def _moved(m, big, l):
    """(m - M) l, 0 where a part saw nothing (l = 0, m = -inf)."""
    return torch.where(l > 0, m - big, 0.0) * l


def merge(part: torch.Tensor, arg: torch.Tensor | None, div: int | None = None):
    """Folds part [planes, parts, n] (and the statistics' argmax ids arg [parts, n], global ids)
    into one part: (merged [planes, n], arg [n] or None). Planes: the first 3 or 7 (one head), or
    all 11 of PLANES with div (the a plane is KL_DIR div's: 0 KL(ref || p), 1 KL(p || ref), 2 none).
    The statistics planes are merged only with arg."""
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
        if div == 2:
            out[PLANES["a"]] = 0.0
        else:
            # each part's a is relative to its own maxes: move it to the overall ones
            shift = torch.where(l_r > 0, m_r - big_r, 0.0) - torch.where(l_z > 0, m_z - big_z, 0.0)
            if div == 0:
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


def finish_kl(merged: torch.Tensor, arg: torch.Tensor | None, y: torch.Tensor | None, div: int):
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
    if div == 2:
        return out
    a = merged[PLANES["a"]]
    # KL(ref || pol) = a / l_r - log l_r + log l_z, KL(pol || ref) = a / l_z - log l_z + log l_r
    if div == 0:
        out["div"] = a / rtotal - torch.log(rtotal) + torch.log(ztotal)
    else:
        out["div"] = out["aux"] = a / ztotal - torch.log(ztotal) + torch.log(rtotal)
    return out
