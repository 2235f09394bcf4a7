"""Vocabulary-parallel heads on torch.distributed, and DTensor heads.

Layout (Megatron's vocab-parallel cross-entropy): every rank of `process_group` holds the same
hidden states (and ref_hidden) and targets; rank r holds the contiguous vocabulary shard
weight [V_r, D] (bias [V_r]) of global ids [offset_r, offset_r + V_r), shards in rank order, any
sizes (V_r = 0 allowed); targets are global ids.

Forward: each rank runs the single-device kernels on its shard (targets another rank owns are
marked absent, so they add no target logit) and keeps the per-row partials of
fusedpref/_partials.py; one all_gather of those [planes, Nv] per call, then every rank merges
the world's partials by the same rule that merges a kernel's vocabulary splits, in rank order
(so ties of the argmax go to the lowest global id, as on one device). The JSD adds one
all_reduce of two per-row sums. Backward needs nothing from other ranks: the kernels' dz of a
shard depends only on that shard's logits and the merged per-row lse (and KL, entropy, ...), so
each rank computes dW, db of its shard and its partial dH = dz @ W_r, which one all_reduce (fp32)
sums, unless the caller's framework reduces it (reduce_hidden_grad=False).

Bytes sent per rank and call, Nv valid rows: 8 * 5 (the layout/consistency check), 4 * P * Nv
(P planes: 3 for one head, 11 for two; with statistics one head has 8, two heads 12, the argmax id
included), + 8 * Nv for the JSD's sums; backward 4 * Nv * D (the all_reduce of dH). Nothing of
size V crosses ranks (README "Distributed" derives the per-step totals).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ._checks import range_error
from ._library import _impl, _valid_rows
from ._partials import ONE_HEAD, PLANES, finish_kl, finish_logprob, merge
from .chunked import acc_dtype, target_direction

_EXACT_IDS = 2 ** 24      # argmax ids travel as float32 planes


def all_gather(out: torch.Tensor, t: torch.Tensor, group) -> torch.Tensor:
    """out [world * len(t), ...] = every rank's t in rank order (all_gather_single where this torch
    has it: newer ones deprecate all_gather_into_tensor)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t, group=group)
    return out


class VocabShard:
    """This rank's place in a vocabulary-parallel group, from one all_gather of
    (V_r, rows, D, valid rows, targets checksum): sizes, offset, global V; raises a clear error
    when the ranks disagree on anything but their shard."""

    def __init__(self, group, weight_rows: int, hidden: torch.Tensor, targets: torch.Tensor, valid: int):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("process_group given but torch.distributed is not initialised "
                               "(call torch.distributed.init_process_group first)")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError("this process is not a member of process_group")
        self.device = hidden.device
        checksum = int((targets.long() * torch.arange(1, targets.numel() + 1, device=targets.device)).sum()) \
            if targets.numel() else 0
        mine = torch.tensor([weight_rows, hidden.shape[0], hidden.shape[-1], valid, checksum], dtype=torch.int64,
                            device=self.device)
        every = torch.empty(self.world * mine.numel(), dtype=torch.int64, device=self.device)
        all_gather(every, mine, group)
        every = every.view(self.world, -1).tolist()
        for col, what in ((1, "the row counts of hidden"), (2, "the hidden sizes D"),
                          (3, "the numbers of valid targets"), (4, "the targets (checksums)")):
            if len({row[col] for row in every}) != 1:
                raise ValueError(f"vocabulary-parallel heads need the same hidden states and targets on every rank "
                                 f"of process_group; {what} differ across ranks "
                                 f"({[row[col] for row in every]}). Ranks that hold different data (data "
                                 "parallel, FSDP) must not pass process_group: gather the head instead")
        self.sizes = [row[0] for row in every]
        self.offset = sum(self.sizes[: self.rank])
        self.size = weight_rows
        self.vocab = sum(self.sizes)
        if self.vocab >= _EXACT_IDS:
            raise ValueError(f"vocabulary-parallel heads support V < 2^24, got V={self.vocab}")

    def local_targets(self, y: torch.Tensor, absent: int) -> torch.Tensor:
        """Global ids -> ids in this shard, `absent` where another rank owns the target."""
        own = (y >= self.offset) & (y < self.offset + self.size)
        return torch.where(own, y - self.offset, absent)

    def merge(self, planes: torch.Tensor, arg: torch.Tensor | None, div: int | None = None):
        """The world's partials [planes, Nv] merged (one all_gather): (merged [planes, Nv], global
        argmax ids [Nv] or None)."""
        if arg is not None:
            planes = torch.cat([planes, (arg.to(torch.int64) + self.offset).to(planes.dtype)[None]])
        planes = planes.contiguous()
        every = planes.new_empty((self.world * planes.shape[0], planes.shape[1]))
        all_gather(every, planes, self.group)
        every = every.view(self.world, planes.shape[0], planes.shape[1]).transpose(0, 1)
        if arg is not None:
            arg, every = every[-1].to(torch.int64), every[:-1]
        return merge(every, arg, div)

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        return t


def _absent(ignore_index: int) -> int:
    return -2 if ignore_index == -1 else -1


def _empty_partials(n, planes, with_stats, dtype, device):
    """The partials of an empty shard: no logits (m = -inf, sums 0)."""
    part = torch.zeros((planes, n), dtype=dtype, device=device)
    part[PLANES["m_z"]] = float("-inf")
    if with_stats:
        part[PLANES["amax"]] = float("-inf")
    if planes == len(PLANES):
        part[PLANES["m_r"]] = float("-inf")
    return part, (torch.zeros(n, dtype=torch.int64, device=device) if with_stats else None)


def _layout(group, weight, hidden, targets, ignore_index):
    """(shard, valid rows, their global targets, their ids in this shard) of one head call: the
    rows found once, the range checked against the group's whole vocabulary."""
    idx, y = _valid_rows(targets, ignore_index)
    shard = VocabShard(group, weight.shape[0], hidden, targets, idx.numel())
    err = range_error(targets, shard.vocab, ignore_index)
    if err is not None:
        raise err
    return shard, idx, y, shard.local_targets(y, _absent(ignore_index))


class Saved:
    """What a vocabulary-parallel backward needs besides the tensors: the layout and valid rows."""

    def __init__(self, shard, idx, y_local):
        self.shard, self.idx, self.y_local = shard, idx, y_local


def _expectation(acc, local_max, merged_max, total):
    """This shard's part of E[k W] = e^(m_r - M) acc_r / L from its acc_r (relative to its own max
    m_r) and the merged max M and sum L; the group's expectation is the sum over the shards."""
    factor = torch.exp(local_max - merged_max) / total
    return acc * factor[:, None].to(acc.dtype)


def _shard_direction(weight, y_local, zy, expectation, softcap, scale):
    """This shard's part of a frozen head's dlogp/dh, d_r = [target here] k(z_y) W_r[y] - E_r[k W]
    (fp32 [Nv, D]); the group's d is the sum over the shards, which the backward's all_reduce of
    dH forms."""
    return target_direction(weight, y_local, zy, softcap, scale, expectation.dtype) - expectation


def logprob_fwd(hidden, weight, targets, bias, ignore_index, softcap, scale, backend, with_stats, group,
                frozen=False):
    """As fusedpref._library.logprob_fwd (frozen: logprob_fwd_frozen) over a vocabulary-parallel
    group: (logp [n], lse [n], stats [n, 4] or [0], this shard's direction [n, D] or None, Saved)."""
    n = targets.shape[0]
    dt = acc_dtype(hidden.dtype)
    shard, idx, y, y_local = _layout(group, weight, hidden, targets, ignore_index)
    logp, lse = hidden.new_zeros(n, dtype=dt), hidden.new_zeros(n, dtype=dt)
    stats = hidden.new_zeros((n, 4) if with_stats else (0,), dtype=dt)
    direction = hidden.new_zeros((n, hidden.shape[1]), dtype=dt) if frozen else None
    if idx.numel():
        h = hidden.index_select(0, idx)
        with torch.autocast(hidden.device.type, enabled=False):
            acc = None
            if shard.size and frozen:
                planes, arg, acc = _impl(backend).logprob_partials_frozen(h, weight, bias, y_local, softcap,
                                                                          with_stats, scale=scale)
            elif shard.size:
                planes, arg = _impl(backend).logprob_partials(h, weight, bias, y_local, softcap, with_stats,
                                                              scale=scale)
            else:
                planes, arg = _empty_partials(idx.numel(), ONE_HEAD if with_stats else 3, with_stats, dt,
                                              hidden.device)
            planes = planes.to(dt)
            merged, best = shard.merge(planes, arg)
            lp, ls, st = finish_logprob(merged, best, y)
            if acc is not None:
                ep = _expectation(acc, planes[PLANES["m_z"]], merged[PLANES["m_z"]], merged[PLANES["l_z"]])
                direction.index_copy_(0, idx, _shard_direction(weight, y_local, planes[PLANES["zy"]], ep, softcap,
                                                               scale).to(dt))
        logp.index_copy_(0, idx, lp)
        lse.index_copy_(0, idx, ls)
        if with_stats:
            stats.index_copy_(0, idx, st)
    return logp, lse, stats, direction, Saved(shard, idx, y_local)


def reduce_direction_grad(saved, dh, reduce_hidden_grad):
    """The frozen path's dH = g d_r [n, D] (fp32) summed over the group on the valid rows."""
    if reduce_hidden_grad and saved.idx.numel():
        rows = dh.index_select(0, saved.idx).contiguous()
        saved.shard.all_reduce_(rows)
        dh.index_copy_(0, saved.idx, rows)
    return dh


def _grads(saved, hidden, weight, bias, got, needs, reduce_hidden_grad):
    """Full-size (dH, dW, db) of this rank from the backend's (valid rows' partial dH in fp32, dW,
    db); dH summed over the group unless the caller reduces it."""
    need_h, need_w, need_b = needs
    dh_v, dw, db = got
    dh = None
    if need_h:
        if reduce_hidden_grad:
            saved.shard.all_reduce_(dh_v)
        dh = torch.zeros_like(hidden)
        dh.index_copy_(0, saved.idx, dh_v.to(hidden.dtype))
    return dh, dw if need_w else None, (db.to(bias.dtype) if need_b else None)


def _no_rows(saved, hidden, weight, bias, needs, reduce_hidden_grad):
    """Gradients when this rank has nothing to contribute (no valid row, or an empty shard)."""
    need_h, need_w, need_b = needs
    dh_v = hidden.new_zeros((saved.idx.numel(), hidden.shape[1]), dtype=torch.float32) if need_h else None
    got = (dh_v, torch.zeros_like(weight) if need_w else None, torch.zeros_like(bias) if need_b else None)
    return _grads(saved, hidden, weight, bias, got, needs, reduce_hidden_grad)


def logprob_bwd(saved, grad, grad_stats, hidden, weight, bias, lse, stats, softcap, scale, backend, needs,
                reduce_hidden_grad):
    """(dH [n, D] or None, dW [V_r, D] or None, db [V_r] or None) of sum_i grad_i logp_i (+ the
    statistics' upstream gradient) over the group: dz of this shard from the merged lse."""
    idx = saved.idx
    if idx.numel() == 0 or saved.shard.size == 0:
        return _no_rows(saved, hidden, weight, bias, needs, reduce_hidden_grad)
    rows = lambda t: None if t is None else t.index_select(0, idx)  # noqa: E731
    with torch.autocast(hidden.device.type, enabled=False):
        got = _impl(backend).logprob_backward(rows(hidden), weight, bias, saved.y_local, rows(lse), rows(grad),
                                              softcap, *needs, scale=scale, g_stats=rows(grad_stats),
                                              stats=rows(stats), dh_dtype=acc_dtype(hidden.dtype))
    return _grads(saved, hidden, weight, bias, got, needs, reduce_hidden_grad)


def kl_fwd(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, ignore_index, softcap, scale,
           ref_softcap, ref_scale, div, beta, backend, with_logp, with_stats, group, frozen=False):
    """As fusedpref._library.kl_fwd over a vocabulary-parallel group: (div, lse, rlse, aux [n];
    logp, ref_logp [n] or [0]; stats [n, 4] or [0]; Saved), and with frozen (div 0, a frozen policy
    head: kl_fwd_frozen's one sweep) first this shard's parts of the directions (d_lp [n, D] or
    None, d_kl [n, D]), then Saved."""
    n = targets.shape[0]
    dt = acc_dtype(hidden.dtype)
    shard, idx, y, y_local = _layout(group, weight, hidden, targets, ignore_index)
    dv, lse, rlse, aux = (hidden.new_zeros(n, dtype=dt) for _ in range(4))
    logp, ref_logp = (hidden.new_zeros(n if with_logp else 0, dtype=dt) for _ in range(2))
    stats = hidden.new_zeros((n, 4) if with_stats else (0,), dtype=dt)
    d_lp = hidden.new_zeros((n, hidden.shape[1]), dtype=dt) if frozen and with_logp else None
    d_kl = hidden.new_zeros((n, hidden.shape[1]), dtype=dt) if frozen else None
    if idx.numel():
        h, rh = hidden.index_select(0, idx), ref_hidden.index_select(0, idx)
        impl = _impl(backend)
        opts = dict(scale=scale, ref_softcap=ref_softcap, ref_scale=ref_scale)
        yl = y_local if with_logp else None
        with torch.autocast(hidden.device.type, enabled=False):
            acc_p = None
            if shard.size and frozen:
                planes, arg, acc_p, acc_q = impl.kl_partials_frozen(h, weight, bias, rh, ref_weight, ref_bias,
                                                                    softcap, yl, with_stats, **opts)
            elif shard.size:
                planes, arg = impl.kl_partials(h, weight, bias, rh, ref_weight, ref_bias, softcap, yl, with_stats,
                                               div=div, **opts)
            else:
                planes, arg = _empty_partials(idx.numel(), len(PLANES), with_stats, dt, hidden.device)
            planes = planes.to(dt)
            merged, best = shard.merge(planes, arg, div)
            out = finish_kl(merged, best, y if with_logp else None, div)
            if acc_p is not None:      # d_kl = E_p[kW] - E_ref[kW], d_lp = k(z_y) W[y] - E_p[kW], per shard
                ep = _expectation(acc_p, planes[PLANES["m_z"]], merged[PLANES["m_z"]], out["ztotal"])
                eq = _expectation(acc_q, planes[PLANES["m_r"]], merged[PLANES["m_r"]], out["rtotal"])
                d_kl.index_copy_(0, idx, (ep - eq).to(dt))
                if d_lp is not None:
                    d_lp.index_copy_(0, idx, _shard_direction(weight, y_local, planes[PLANES["zy"]], ep, softcap,
                                                              scale).to(dt))
            if div == 2:   # the second pass over each shard given the merged lse, then one all_reduce
                if shard.size:
                    jsd, kls = impl.jsd_sums(h, weight, bias, rh, ref_weight, ref_bias, out["lse"], out["rlse"],
                                             softcap, beta=beta, **opts)
                    sums = torch.stack([jsd, kls]).to(dt)
                else:
                    sums = hidden.new_zeros((2, idx.numel()), dtype=dt)
                out["div"], out["aux"] = shard.all_reduce_(sums.contiguous())
        for t, k in ((dv, "div"), (lse, "lse"), (rlse, "rlse"), (logp, "logp"), (ref_logp, "ref_logp"),
                     (stats, "stats"), (aux, "aux")):
            if out[k] is not None:
                t.index_copy_(0, idx, out[k].to(dt))
    saved = Saved(shard, idx, y_local)
    if frozen:
        return dv, lse, rlse, aux, logp, ref_logp, stats, d_lp, d_kl, saved
    return dv, lse, rlse, aux, logp, ref_logp, stats, saved


def kl_bwd(saved, grad_div, grad_logp, grad_stats, hidden, weight, ref_hidden, ref_weight, bias, ref_bias, lse,
           rlse, aux, stats, softcap, scale, ref_softcap, ref_scale, div, beta, backend, needs, reduce_hidden_grad):
    """Gradients of sum_i grad_div_i div_i (+ grad_logp_i logp_i + the statistics' term) w.r.t.
    this rank's policy shard, as logprob_bwd."""
    idx = saved.idx
    if idx.numel() == 0 or saved.shard.size == 0:
        return _no_rows(saved, hidden, weight, bias, needs, reduce_hidden_grad)
    rows = lambda t: None if t is None else t.index_select(0, idx)  # noqa: E731
    with torch.autocast(hidden.device.type, enabled=False):
        got = _impl(backend).kl_backward(
            rows(hidden), weight, bias, rows(ref_hidden), ref_weight, ref_bias, rows(lse), rows(rlse), rows(grad_div),
            softcap, *needs, y=saved.y_local if grad_logp is not None else None, g_lp=rows(grad_logp), scale=scale,
            ref_softcap=ref_softcap, ref_scale=ref_scale, div=div, beta=beta, aux=rows(aux) if div else None,
            g_stats=rows(grad_stats), stats=rows(stats), dh_dtype=acc_dtype(hidden.dtype))
    return _grads(saved, hidden, weight, bias, got, needs, reduce_hidden_grad)


def global_vocab(weight_rows: int, group, device) -> int:
    """The group's whole vocabulary size (one all_reduce of an int64)."""
    t = torch.tensor([weight_rows], dtype=torch.int64, device=device)
    dist.all_reduce(t, group=group)
    return int(t.item())


# ---------------------------------------------------------------- DTensor heads

def _placements(t):
    return tuple(t.placements) if _is_dtensor(t) else None


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:     # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def resolve(hidden, heads, process_group, names, hidden_name="hidden"):
    """Turns DTensor arguments into what the heads take: (hidden, [(weight, bias), ...], process_group).

    - weight (and bias) a DTensor Shard(0) on a 1-D mesh, with process_group given (it must be the
      mesh's group) or hidden a DTensor Replicate() on the same mesh: tensor parallel, each rank's
      local shard is its vocabulary shard (process_group from the mesh);
    - weight a DTensor Shard(0) and hidden a plain tensor, no process_group: FSDP2, ranks hold
      different data: the head is gathered once here (full_tensor), its gradient reduce-scattered
      and averaged over the mesh as FSDP2 reduces every other parameter's;
    - anything else (other placements, meshes of more than one dimension) raises.
    heads: [(weight, bias) or None, ...] (policy, reference, ...); names: their argument names.
    """
    from torch.distributed.tensor import Shard

    tensors = [t for pair in heads if pair is not None for t in pair if t is not None]
    if not _is_dtensor(hidden) and not any(_is_dtensor(t) for t in tensors):
        return hidden, heads, process_group
    mesh = None
    for pair, (wn, bn) in zip(heads, names):
        if pair is None:
            continue
        for t, name in zip(pair, (wn, bn)):
            if t is None:
                continue
            if not _is_dtensor(t):
                raise TypeError(f"{name} is a plain tensor but another head argument is a DTensor: pass all "
                                "DTensors (sharded alike) or all plain tensors")
            if t.device_mesh.ndim != 1 or _placements(t) != (Shard(0),):
                raise ValueError(f"{name} is a DTensor with placements {list(t.placements)} on a "
                                 f"{t.device_mesh.ndim}-D mesh; supported: Shard(0) on a 1-D mesh (a vocabulary "
                                 "shard per rank). Gather or redistribute it first")
            if mesh is not None and t.device_mesh != mesh:
                raise ValueError(f"{name} lives on another device mesh than the other head tensors")
            mesh = t.device_mesh
    if _is_dtensor(hidden):
        if mesh is None or hidden.device_mesh != mesh or any(not p.is_replicate() for p in hidden.placements):
            raise ValueError(f"{hidden_name} is a DTensor: it must be Replicate() on the weight's mesh (tensor "
                             f"parallel: every rank holds the same hidden states); got placements "
                             f"{list(hidden.placements)}")
        hidden = hidden.to_local()
        tensor_parallel = True
    else:
        tensor_parallel = process_group is not None
    if mesh is None:
        return hidden, heads, process_group
    if tensor_parallel:
        group = mesh.get_group()
        if process_group is not None and dist.get_process_group_ranks(process_group) != \
                dist.get_process_group_ranks(group):
            raise ValueError("process_group is not the process group of the weight's device mesh "
                             "(weight.device_mesh.get_group())")
        local = [None if pair is None else tuple(None if t is None else t.to_local() for t in pair) for pair in heads]
        return hidden, local, group
    return hidden, [None if pair is None else tuple(gather(t) for t in pair) for pair in heads], None


def resolve_heads(hidden, weight, bias, ref_hidden=None, ref_weight=None, ref_bias=None, process_group=None):
    """resolve() of a policy head and an optional reference head: (hidden, weight, bias, ref_hidden,
    ref_weight, ref_bias, process_group), each DTensor turned into what the heads take."""
    heads = [(weight, bias)] + ([(ref_weight, ref_bias)] if ref_weight is not None else [])
    hidden, heads, process_group = resolve(hidden, heads, process_group,
                                           [("weight", "bias"), ("ref_weight", "ref_bias")])
    (weight, bias), *ref = heads
    if ref:
        (ref_weight, ref_bias), = ref
    return hidden, weight, bias, resolve_hidden(ref_hidden, "ref_hidden"), ref_weight, ref_bias, process_group


def gather(t):
    """A DTensor gathered once, FSDP2's way: the full tensor, whose gradient is reduce-scattered and
    averaged over the mesh (each rank's data differ; with identical data it is the same gradient).
    Anything else comes back unchanged."""
    if not _is_dtensor(t):
        return t
    from torch.distributed.tensor import Partial

    return t.full_tensor(grad_placements=[Partial("avg")] * t.device_mesh.ndim)


def resolve_hidden(t, name):
    """A reference hidden state given as a DTensor Replicate(): its local tensor."""
    if _is_dtensor(t):
        if any(not p.is_replicate() for p in t.placements):
            raise ValueError(f"{name} is a DTensor: it must be Replicate() (every rank the same rows); got "
                             f"{list(t.placements)}")
        return t.to_local()
    return t
