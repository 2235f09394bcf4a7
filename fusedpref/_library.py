"""The one pipeline of every fused head call, as two torch.library custom ops.

    forward  (fusedpref::head_fwd):  compact the valid rows -> the backend's partials of this
             vocabulary (merged over its splits) -> with a process group, all_gather and merge
             over the shards -> finish (log-probs, lse, divergence, statistics, a frozen head's
             directions) -> the JSD's second pass -> scatter to all rows
    backward (fusedpref::head_bwd):  compact -> dz chunks -> dH, dW, db (or, on the frozen
             one-pass path, dH = g d) -> with a process group, the dH all_reduce -> scatter

Every call kind (one head; two heads with any divergence; frozen or not; sharded or not) runs
this code; what differs is the `HeadCall` (fusedpref/_spec.py), which the ops take as flat
scalars (HeadCall.op_args).
torch.compile (fullgraph=True) treats each op as one opaque call with a known output shape (the
fake implementations below), so everything data-dependent happens inside: the target range
check, the compaction (rows whose target is ignore_index cost no matmul work), the collectives.

Inputs are flat: hidden [n, D], targets [n] int64. Per-row outputs cover all n rows (0 on
ignored rows) in float32, or float64 for float64 inputs; an output or gradient that is not
wanted comes back as an empty tensor.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import chunked
from ._checks import range_error
from ._partials import PLANES, ONE_HEAD, Partials, acc_dtype, empty_partials, expectation, finish_kl, \
    finish_logprob, target_direction, transform_grad
from ._spec import Divergence, Head, HeadCall, LossRows, Needs, SeqSums
from .distributed import VocabShard, call_code

N_STATS = 4   # columns of the statistics: sum of logits, entropy, argmax hit, log sum_v p^2


class HeadOut(NamedTuple):
    """The forward's outputs, per row (empty where the call does not ask for them)."""
    logp: Tensor        # [n]      the policy's target log-probs
    ref_logp: Tensor    # [n]      the reference's (two heads with log-probs)
    div: Tensor         # [n]      the divergence (two heads)
    lse: Tensor         # [n]      the policy's log-sum-exp (saved for backward)
    rlse: Tensor        # [n]      the reference's (two heads)
    aux: Tensor         # [n]      what the divergence's backward needs besides (REVERSE_KL: the KL, JSD: KL(p || m))
    stats: Tensor       # [n, 4]   the policy's statistics
    d_lp: Tensor        # [n, D]   one-pass frozen head: dlogp/dh
    d_kl: Tensor        # [n, D]   one-pass frozen head, two heads: dKL/dh
    shards: Tensor      # [world]  int64, the vocabulary size of each shard ([V] on one device)


class RowState(NamedTuple):
    """What a backend's backward reads of the forward, on the valid rows."""
    lse: Tensor
    rlse: Optional[Tensor]
    aux: Optional[Tensor]
    stats: Optional[Tensor]


class RowGrads(NamedTuple):
    """The upstream gradients on the valid rows (None where an output got none)."""
    logp: Optional[Tensor]
    div: Optional[Tensor]
    stats: Optional[Tensor]


def _impl(backend: str):
    if backend == "triton":
        from . import ops  # imported lazily: the torch backend needs no triton

        return ops
    return chunked


def _no_autocast(fn):
    """Runs an op's real implementation with autocast off: its operands already have the dtypes
    chosen outside (autocast casts happen in fusedpref.functions, as F.linear's would)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next(a for a in args if isinstance(a, Tensor)).device
        with torch.autocast(device.type, enabled=False):
            return fn(*args, **kwargs)
    return run


def _world(call: HeadCall) -> int:
    if call.group is None:
        return 1
    from .distributed import _group
    import torch.distributed as dist

    return dist.get_world_size(_group(call.group))


def _out_shapes(call: HeadCall, n: int, width: int) -> HeadOut:
    two, pair = call.two_heads, call.two_heads and call.logp
    return HeadOut(logp=(n if call.logp else 0,), ref_logp=(n if pair else 0,), div=(n if two else 0,), lse=(n,),
                   rlse=(n if two else 0,), aux=(n if two else 0,), stats=(n, N_STATS) if call.stats else (0,),
                   d_lp=(n, width) if call.one_pass and call.logp else (0,),
                   d_kl=(n, width) if call.one_pass and two else (0,), shards=(_world(call),))


class Rows:
    """The valid rows of a call (idx; their global targets y) and, under a process group, this
    rank's shard (their targets in its ids: local, -1 or -2 where another rank owns the target)."""

    def __init__(self, call: HeadCall, targets: Tensor, shard: VocabShard | None, vocab: int):
        self.idx = (targets != call.ignore_index).nonzero().squeeze(1)
        self.y = targets.index_select(0, self.idx)
        self.shard = shard
        absent = -2 if call.ignore_index == -1 else -1
        self.local = self.y if shard is None else shard.local_targets(self.y, absent)
        self.vocab = vocab
        self.count = self.idx.numel()
        self.empty_shard = shard is not None and shard.size == 0

    @classmethod
    def forward(cls, call: HeadCall, head: Head, targets: Tensor) -> "Rows":
        """The rows of a forward: the target range checked (against the group's whole vocabulary;
        there, first the layout and consistency collective)."""
        vocab = head.w.shape[0]
        if call.group is None:
            err = range_error(targets, vocab, call.ignore_index)
            if err is not None:
                raise err
            return cls(call, targets, None, vocab)
        valid = int((targets != call.ignore_index).sum())
        shard = VocabShard.gathered(call.group, call_code(call.op_args()), head.w, head.h, targets, valid)
        shard.check_range(targets, call.ignore_index)
        return cls(call, targets, shard, shard.vocab)

    @classmethod
    def backward(cls, call: HeadCall, targets: Tensor, shards: Tensor) -> "Rows":
        shard = None if call.group is None else VocabShard.from_sizes(call.group, shards)
        return cls(call, targets, shard, int(shards.sum()))

    def sizes(self, device) -> Tensor:
        if self.shard is None:
            return torch.tensor([self.vocab], dtype=torch.int64, device=device)
        return self.shard.sizes_tensor(device)

    def merge(self, part: Partials, call: HeadCall):
        """(merged planes [P, Nv], global argmax ids [Nv] or None) of this call's vocabulary."""
        div = call.divergence if call.two_heads else None
        if self.shard is None:
            return part.planes, part.arg
        return self.shard.merge(part.planes, part.arg, div)

    def reduce_(self, t: Tensor) -> Tensor:
        """t summed over the shards (in place); on one device t itself."""
        return t if self.shard is None else self.shard.all_reduce_(t.contiguous())


def _compact(head: Head | None, rows: Rows) -> Head | None:
    """The head on the valid rows only (rows whose target is ignored cost no matmul work)."""
    return None if head is None else head._replace(h=head.h.index_select(0, rows.idx))


def _partials(call: HeadCall, pol: Head, ref: Head | None, rows: Rows, dt) -> Partials:
    """The backend's partials of this rank's vocabulary on the valid rows."""
    if rows.empty_shard:
        planes = ONE_HEAD if call.stats else 3
        return empty_partials(rows.count, len(PLANES) if ref else planes, call.stats,
                              pol.h.shape[1] if call.one_pass else 0, ref is not None, dt, pol.h.device)
    impl, y = _impl(call.backend), rows.local
    if ref is None:
        part = (impl.logprob_partials_frozen if call.one_pass else impl.logprob_partials)(pol, y, call.stats)
    elif call.one_pass:
        part = impl.kl_partials_frozen(pol, ref, y if call.logp else None, call.stats)
    else:
        part = impl.kl_partials(pol, ref, y if call.logp else None, call.stats, call.divergence)
    return part._replace(planes=part.planes.to(dt))


def _finish(call: HeadCall, part: Partials, rows: Rows, pol: Head) -> dict:
    """The per-row results of the merged partials; a frozen head's directions from this part's
    accumulators (on a shard, its share: the dH all_reduce sums them)."""
    merged, arg = rows.merge(part, call)
    if not call.two_heads:
        res = dict(zip(("logp", "lse", "stats"), finish_logprob(merged, arg, rows.y)))
    else:
        res = finish_kl(merged, arg, rows.y if call.logp else None, call.divergence)
    if call.one_pass and not rows.empty_shard:
        planes = part.planes
        ep = expectation(part.acc_p, planes[PLANES["m_z"]], merged[PLANES["m_z"]], merged[PLANES["l_z"]])
        if call.logp:      # dlogp/dh = k(z_y) W[y] - E_p[k W]
            res["d_lp"] = target_direction(pol.w, rows.local, planes[PLANES["zy"]], pol.xf, ep.dtype) - ep
        if call.two_heads:     # dKL/dh = E_p[k W] - E_ref[k W]
            res["d_kl"] = ep - expectation(part.acc_q, planes[PLANES["m_r"]], merged[PLANES["m_r"]],
                                           merged[PLANES["l_r"]])
    return res


def forward(call: HeadCall, pol: Head, ref: Head | None, targets: Tensor) -> HeadOut:
    """The forward pipeline (see the module docstring)."""
    n = targets.shape[0]
    dt = acc_dtype(pol.h.dtype)
    shapes = _out_shapes(call, n, pol.h.shape[1])
    out = HeadOut(*(pol.h.new_zeros(s, dtype=dt) for s in shapes[:-1]), shards=None)
    rows = Rows.forward(call, pol, targets)
    if rows.count:
        p, r = _compact(pol, rows), _compact(ref, rows)
        res = _finish(call, _partials(call, p, r, rows, dt), rows, p)
        if call.jsd:   # the second pass given the merged lse (each shard its part), then the sum
            if rows.empty_shard:
                sums = p.h.new_zeros((2, rows.count), dtype=dt)
            else:
                sums = torch.stack(_impl(call.backend).jsd_sums(p, r, res["lse"], res["rlse"], call.mix)).to(dt)
            res["div"], res["aux"] = rows.reduce_(sums)
        for name, t in zip(HeadOut._fields, out):
            if t is not None and t.numel() and res.get(name) is not None:
                t.index_copy_(0, rows.idx, res[name].to(dt))
    return out._replace(shards=rows.sizes(pol.h.device))


def backward(call: HeadCall, pol: Head, ref: Head | None, targets: Tensor, saved: HeadOut, grads: RowGrads,
             needs: Needs):
    """(dH [n, D], dW [V, D], db [V]) of sum_i <grads_i, outputs_i> w.r.t. the policy head, empty
    where not needed (see the module docstring)."""
    rows = Rows.backward(call, targets, saved.shards)
    sharded = rows.shard is not None
    dt = acc_dtype(pol.h.dtype)
    take = lambda t: None if t is None or not t.numel() else t.index_select(0, rows.idx)  # noqa: E731
    g = RowGrads(*(take(t) for t in grads))
    dh_v = dw = db = None
    if call.one_pass and g.stats is None:      # dH = g_lp d_lp + g_kl d_kl: no pass over the vocabulary
        dh_v = pol.h.new_zeros((rows.count, pol.h.shape[1]), dtype=dt)
        if g.logp is not None:
            dh_v += g.logp.to(dt)[:, None] * take(saved.d_lp)
        if g.div is not None:
            dh_v += g.div.to(dt)[:, None] * take(saved.d_kl)
    elif rows.count and not rows.empty_shard:
        state = RowState(take(saved.lse), take(saved.rlse), take(saved.aux), take(saved.stats))
        dh_v, dw, db = _impl(call.backend).backward(
            call, _compact(pol, rows), _compact(ref, rows), rows.local, state, g, needs, dh_dtype=dt if sharded else None)
    if needs.h and dh_v is None:
        dh_v = pol.h.new_zeros((rows.count, pol.h.shape[1]), dtype=dt if sharded else pol.h.dtype)
    if needs.h and sharded and call.reduce_hidden_grad and rows.count:
        dh_v = rows.reduce_(dh_v)          # fp32: the sum over shards rounds once, as on one device
    nothing = lambda: pol.h.new_empty(0)  # noqa: E731   (outputs of a custom op must not alias)
    dh = nothing()
    if needs.h:
        dh = torch.zeros_like(pol.h)
        dh.index_copy_(0, rows.idx, dh_v.to(pol.h.dtype))
    dw = (dw if dw is not None else torch.zeros_like(pol.w)) if needs.w else nothing()
    db = (db.to(pol.b.dtype) if db is not None else torch.zeros_like(pol.b)) if needs.b else nothing()
    return dh, dw, db


# ---------------------------------------------------------------- the custom ops

def _heads(call: HeadCall, hidden, weight, bias, ref_hidden, ref_weight, ref_bias):
    pol = Head(hidden, weight, bias, call.policy)
    return pol, (None if ref_hidden is None else Head(ref_hidden, ref_weight, ref_bias, call.ref))


# The ops' scalar parameters follow the tensors, in HeadCall.op_args order (fusedpref._spec.OP_ARGS).
@torch.library.custom_op("fusedpref::head_fwd", mutates_args=(), schema=(
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor? ref_hidden, Tensor? ref_weight, Tensor? ref_bias, "
    "Tensor targets, float? softcap, float? scale, bool two_heads, float? ref_softcap, float? ref_scale, "
    "int divergence, float mix, int ignore_index, str backend, bool logp, bool stats, bool one_pass, str? group, "
    "bool reduce_hidden_grad, float grad_filter) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
    "Tensor, Tensor)"))
@_no_autocast
def head_fwd(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, *call):
    """HeadOut of one call (call: HeadCall.op_args())."""
    spec = HeadCall.from_op_args(call)
    return tuple(forward(spec, *_heads(spec, hidden, weight, bias, ref_hidden, ref_weight, ref_bias), targets))


@head_fwd.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, *call):
    spec = HeadCall.from_op_args(call)
    dt = acc_dtype(hidden.dtype)
    shapes = _out_shapes(spec, targets.shape[0], hidden.shape[1])
    return (*(hidden.new_empty(s, dtype=dt) for s in shapes[:-1]), hidden.new_empty(shapes[-1], dtype=torch.int64))


@torch.library.custom_op("fusedpref::head_bwd", mutates_args=(), schema=(
    "(Tensor? grad_logp, Tensor? grad_div, Tensor? grad_stats, Tensor hidden, Tensor weight, Tensor? bias, "
    "Tensor? ref_hidden, Tensor? ref_weight, Tensor? ref_bias, Tensor targets, Tensor lse, Tensor rlse, "
    "Tensor aux, Tensor stats_saved, Tensor d_lp, Tensor d_kl, Tensor shards, bool need_h, bool need_w, "
    "bool need_b, float? softcap, float? scale, bool two_heads, float? ref_softcap, float? ref_scale, "
    "int divergence, float mix, int ignore_index, str backend, bool logp, bool stats, bool one_pass, str? group, "
    "bool reduce_hidden_grad, float grad_filter) -> (Tensor, Tensor, Tensor)"))
@_no_autocast
def head_bwd(grad_logp, grad_div, grad_stats, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, lse,
             rlse, aux, stats, d_lp, d_kl, shards, need_h, need_w, need_b, *call):
    """(dH [n, D], dW [V, D], db [V]) of sum_i <grads_i, outputs_i>, empty where not needed."""
    spec = HeadCall.from_op_args(call)
    saved = HeadOut(None, None, None, lse, rlse, aux, stats, d_lp, d_kl, shards)
    return backward(spec, *_heads(spec, hidden, weight, bias, ref_hidden, ref_weight, ref_bias), targets, saved,
                    RowGrads(grad_logp, grad_div, grad_stats), Needs(need_h, need_w, need_b))


@head_bwd.register_fake
def _(grad_logp, grad_div, grad_stats, hidden, weight, bias, *rest):
    need_h, need_w, need_b = rest[11:14]
    return (torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else hidden.new_empty(0),
            torch.empty_like(bias) if need_b else hidden.new_empty(0))


# ---------------------------------------------------------------- calling them

def _eager() -> bool:
    """Outside torch.compile / export tracing and with no TorchDispatchMode active (FlopCounterMode,
    FakeTensorMode, ...), the ops' implementations run directly: a custom op's first call imports
    torch._dynamo, torch._inductor and sympy (about 1.5 s and 100+ MB on a CPU), which eager use
    should not pay. What the implementations compute is the same either way."""
    return not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0


def run_forward(*args) -> HeadOut:
    """head_fwd(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, *call.op_args())."""
    if _eager():
        with torch.no_grad():              # as inside a custom op: nothing here is recorded by autograd
            return HeadOut(*head_fwd._init_fn(*args))
    return HeadOut(*head_fwd(*args))


def run_backward(*args):
    """head_bwd(grads..., tensors..., saved..., needs..., *call.op_args()) -> (dH, dW, db)."""
    if _eager():
        with torch.no_grad():
            return head_bwd._init_fn(*args)
    return head_bwd(*args)


# ---------------------------------------------------------------- accounting modes see inside the ops

def _run_inside(mode, func, types, args, kwargs):
    """The op's real implementation with the mode active (a TorchDispatchMode would otherwise see
    one opaque call)."""
    with mode:
        return _IMPLS[func](*args, **kwargs)


def see_inside(mode_type) -> None:
    """Lets a TorchDispatchMode type see the aten ops inside fusedpref's custom ops (FLOP counting
    below; the tests' peak-memory probe)."""
    for op in (head_fwd, head_bwd):
        _IMPLS[op._opoverload] = op._init_fn
        op.register_torch_dispatch(mode_type, _run_inside)


_IMPLS: dict = {}


def _register_flop_counting():
    """torch.utils.flop_counter.FlopCounterMode sees the matmuls inside the ops."""
    from torch.utils import flop_counter

    # FlopCounterMode pushes a private TorchDispatchMode (torch >= 2.5); older ones are the mode
    see_inside(getattr(flop_counter, "_FlopCounterMode", flop_counter.FlopCounterMode))


_register_flop_counting()


# ---------------------------------------------------------------- gradients in forward

class Accumulated(NamedTuple):
    dw: Optional[Tensor]
    db: Optional[Tensor]


def _unit_chunks(rows_per_unit: list, width: int, budget_bytes: int, kept_buffers: int):
    """Consecutive units whose kept buffers [rows, V] fit the budget together: [(first, last, kept)],
    kept False for a single unit too large alone (it takes the two-pass route)."""
    chunks, first, used = [], 0, 0
    per_row = width * kept_buffers
    for u, r in enumerate(rows_per_unit):
        if r * per_row > budget_bytes:
            if u > first:
                chunks.append((first, u, True))
            chunks.append((u, u + 1, False))
            first, used = u + 1, 0
        elif used + r * per_row > budget_bytes:
            chunks.append((first, u, True))
            first, used = u, r * per_row
        else:
            used += r * per_row
    if first < len(rows_per_unit):
        chunks.append((first, len(rows_per_unit), True))
    return chunks


def fused_loss(call: HeadCall, pol: Head, ref: Head | None, targets: Tensor, layout: LossRows, unit_grads,
               budget_bytes: int, needs: Needs):
    """The gradients-in-forward pipeline of a loss whose per-unit gradient depends on the other units
    only through the reduction (fusedpref/api.py builds unit_grads from the loss registry).

    Per chunk of units (as many as the kept budget holds): compact rows -> the backend's kept
    partials (the logits once; P = k(z) exp(z - m) kept per vocabulary chunk, and Q for a reference
    head) -> finish (log-probs, statistics, KL) -> sequence sums -> unit_grads(sequences, values)
    gives dL/dlogp and dL/dKL of each sequence -> dz built in the kept buffers -> dH rows, dW, db
    accumulated. 2 (logits) + 2 (dH) + 2 (dW) N D V FLOPs, + 2 for a reference head in the pass. A
    unit too large for the budget alone takes two passes (the statistics, then the recompute
    backward) inside the same forward. unit_grads(units, SeqSums) -> (dL/dlogp [S], dL/dKL [S] or
    None) of those units' terms; a row's log-prob enters its sequence's with layout.weight.

    Returns (SeqSums, per-row statistics [n, 4], dH [n, D] or None, dW or None, db or None)."""
    impl = _impl(call.backend)
    n = targets.shape[0]
    dt = acc_dtype(pol.h.dtype)
    dev = pol.h.device
    rows_all = Rows.forward(call, pol, targets)
    valid = torch.zeros(n, dtype=torch.bool, device=dev)
    valid[rows_all.idx] = True
    seq_of_row = layout.seq
    per_seq = torch.zeros(layout.n_seq, dtype=torch.long, device=dev).index_add_(
        0, seq_of_row[rows_all.idx], torch.ones_like(rows_all.idx))
    per_unit = per_seq[layout.units].sum(1).tolist()
    elem = dt.itemsize if call.backend == "torch" else pol.h.element_size()
    buffers = 2 if ref is not None else 1
    chunks = _unit_chunks(per_unit, pol.w.shape[0] * elem, budget_bytes, buffers)
    logp_seq = torch.zeros(layout.n_seq, dtype=dt, device=dev)
    sums = SeqSums(logp_seq, torch.zeros_like(logp_seq) if ref is not None else None,
                   torch.zeros_like(logp_seq) if ref is not None else None,
                   torch.zeros((layout.n_seq, N_STATS), dtype=dt, device=dev),
                   logp_seq if layout.weight is None else torch.zeros_like(logp_seq))
    stats = pol.h.new_zeros((n, N_STATS), dtype=dt)
    dh = torch.zeros_like(pol.h) if needs.h else None
    acc = Accumulated(torch.zeros(pol.w.shape, dtype=torch.float32 if pol.w.dtype != torch.float64 else dt,
                                  device=dev) if needs.w else None,
                      torch.zeros(pol.w.shape[0], dtype=dt, device=dev) if needs.b else None)
    unit_of_seq = torch.empty(layout.n_seq, dtype=torch.long, device=dev)
    unit_of_seq[layout.units.flatten()] = torch.arange(layout.units.shape[0], device=dev).repeat_interleave(
        layout.units.shape[1])
    unit_of_row = unit_of_seq[seq_of_row]
    for first, last, kept in chunks:
        idx = (valid & (unit_of_row >= first) & (unit_of_row < last)).nonzero().squeeze(1)
        y = targets.index_select(0, idx)
        p = pol._replace(h=pol.h.index_select(0, idx))
        r = None if ref is None else ref._replace(h=ref.h.index_select(0, idx))
        if kept:
            part, keep = impl.kept_partials(p, r, y, True)
        elif r is None:
            part, keep = impl.logprob_partials(p, y, True), None
        else:
            part, keep = impl.kl_partials(p, r, y, True, Divergence.FORWARD_KL), None
        planes = part.planes.to(dt)
        if r is None:
            lp, lse, st = finish_logprob(planes, part.arg, y)
            res = dict(logp=lp, lse=lse, stats=st)
        else:
            res = finish_kl(planes, part.arg, y, Divergence.FORWARD_KL)
        seqs = seq_of_row.index_select(0, idx)
        w_rows = None if layout.weight is None else layout.weight.index_select(0, idx).to(dt)
        lp_rows = res["logp"].to(dt)
        if w_rows is not None:
            sums.raw_logp.index_add_(0, seqs, lp_rows)
        logp_seq.index_add_(0, seqs, lp_rows if w_rows is None else lp_rows * w_rows)
        if ref is not None:
            sums.ref_logp.index_add_(0, seqs, res["ref_logp"].to(dt) if w_rows is None else
                                     res["ref_logp"].to(dt) * w_rows)
            sums.kl.index_add_(0, seqs, res["div"].to(dt))
        stats.index_copy_(0, idx, res["stats"].to(dt))
        sums.stats.index_add_(0, seqs, res["stats"].to(dt))
        g_logp, g_kl = unit_grads(layout.units[first:last], sums)      # [S] each (0 outside the chunk)
        g_lp = g_logp.index_select(0, seqs).to(dt)
        if w_rows is not None:
            g_lp = g_lp * w_rows
        g_div = None if g_kl is None else g_kl.index_select(0, seqs).to(dt)
        if kept:
            zy = planes[PLANES["zy"]]
            k_y = transform_grad(zy, p.xf)
            g_y = g_lp if k_y is None else g_lp * k_y
            big, total = planes[PLANES["m_z"]], planes[PLANES["l_z"]]
            if r is None:
                coefs = (-g_lp / total, big, None, None, g_y)
            else:
                coefs = ((g_div - g_lp) / total, big, -g_div / planes[PLANES["l_r"]], planes[PLANES["m_r"]], g_y)
            # the filter's row scale: |dz| / scale is bounded by the probabilities p (and q)
            scale = g_lp.abs() if r is None else g_lp.abs() + 2 * g_div.abs()
            dh_rows = impl.kept_backward(p, y, keep, coefs, needs, acc, call.grad_filter, scale)
            del keep
        else:
            state = RowState(res["lse"], res.get("rlse"), None, None)
            dh_rows, _, _ = impl.backward(call, p, r, y, state, RowGrads(g_lp, g_div, None), needs, dh_dtype=dt, acc=acc)
        if needs.h:
            dh.index_copy_(0, idx, dh_rows.to(dh.dtype))
    dw = acc.dw.to(pol.w.dtype) if needs.w else None
    db = acc.db.to(pol.b.dtype) if needs.b else None
    return sums, stats, dh, dw, db
