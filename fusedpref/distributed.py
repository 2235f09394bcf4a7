"""Vocabulary-parallel heads on torch.distributed: the shard layout and its collectives.

Layout (Megatron's vocab-parallel cross-entropy): every rank of the process group holds the same
hidden states (and ref_hidden) and targets; rank r holds the contiguous vocabulary shard
weight [V_r, D] (bias [V_r]) of global ids [offset_r, offset_r + V_r), shards in rank order, any
sizes (V_r = 0 allowed); targets are global ids.

The pipeline (fusedpref/_library.py) is the same as on one device; a `VocabShard` adds what a
shard needs: forward, one small all_gather of the layout (and a consistency check) and one
all_gather of the per-row partials [planes, Nv], merged in rank order by the rule that merges a
kernel's vocabulary splits (fusedpref/_partials.py; argmax ties go to the lowest global id, as
on one device); the JSD one all_reduce of two per-row sums. Backward needs nothing from the other
ranks: a shard's dz depends only on its logits and the merged per-row lse (KL, entropy, ...), so
each rank computes dW, db of its shard and its partial dH = dz @ W_r, which one fp32 all_reduce
sums, unless the caller's framework reduces it (reduce_hidden_grad=False).

Bytes sent per rank and call, Nv valid rows: 8 * 8 (the layout/consistency check), 4 * P * Nv
(P planes: 3 for one head, 11 for two; with statistics one head has 8, two heads 12, the argmax id
included), + 8 * Nv for the JSD's sums; backward 4 * Nv * D (the all_reduce of dH). Nothing of
size V crosses ranks (README "Distributed" derives the per-step totals).

DTensor heads are resolved before any of this, in fusedpref/_dtensor.py.
"""
from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from ._checks import range_error
from ._partials import merge

_EXACT_IDS = 2 ** 24      # argmax ids travel as float32 planes


def group_name(process_group) -> str | None:
    """The name a HeadCall carries for process_group (None: no group), after checking its type."""
    if process_group is None:
        return None
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got "
                        f"{type(process_group).__name__}")
    return process_group.group_name


def _group(name: str):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group given but torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def all_gather(out: torch.Tensor, t: torch.Tensor, group) -> torch.Tensor:
    """out [world * len(t), ...] = every rank's t in rank order (all_gather_single where this torch
    has it: newer ones deprecate all_gather_into_tensor)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t, group=group)
    return out


def call_code(op_args: tuple) -> int:
    """A code of the call every rank must make alike (its flat spec; crc32: the same in every process)."""
    return zlib.crc32(repr(op_args).encode())


def _fingerprint(weight: torch.Tensor) -> int:
    """A cheap fingerprint of a shard's rows (its first, middle and last, weighted): the float64 bits
    as an int64, 0 for an empty shard."""
    rows = weight.shape[0]
    if rows == 0:
        return 0
    pick = weight[torch.tensor(sorted({0, rows // 2, rows - 1}), device=weight.device)].double()
    weights = torch.arange(1, pick.numel() + 1, dtype=torch.float64, device=weight.device).view(pick.shape)
    return int((pick * weights).sum().view(torch.int64))


class VocabShard:
    """This rank's place in a vocabulary-parallel group: its shard's size and offset, the global V.

    `gathered` builds it in a forward from one all_gather of (V_r, rows, D, valid rows, a targets
    checksum, the call, the dtype, a fingerprint of the shard's rows) and raises the same clear error
    on every rank when the ranks disagree on anything but their shard, or all hold the same rows
    (the whole head passed on every rank);
    `from_sizes` rebuilds it in backward from the shard sizes the forward returned (no collective)."""

    def __init__(self, group, sizes: list[int]):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError("this process is not a member of process_group")
        self.sizes = sizes
        self.offset = sum(sizes[: self.rank])
        self.size = sizes[self.rank]
        self.vocab = sum(sizes)

    @classmethod
    def gathered(cls, name: str, call_code: int, weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor,
                 valid: int):
        group = _group(name)
        if dist.get_rank(group) < 0:
            raise ValueError("this process is not a member of process_group")
        checksum = int((targets.long() * torch.arange(1, targets.numel() + 1, device=targets.device)).sum()) \
            if targets.numel() else 0
        mine = torch.tensor([weight.shape[0], hidden.shape[0], hidden.shape[-1], valid, checksum, call_code,
                             zlib.crc32(str(hidden.dtype).encode()), _fingerprint(weight)], dtype=torch.int64,
                            device=hidden.device)
        every = torch.empty(dist.get_world_size(group) * mine.numel(), dtype=torch.int64, device=hidden.device)
        all_gather(every, mine, group)
        every = every.view(-1, mine.numel()).tolist()
        if len({row[5] for row in every}) != 1:
            raise ValueError("the ranks of process_group made different fused head calls (another function, "
                             "outputs or options on some rank): every rank must make the same call with its shard")
        if len({row[6] for row in every}) != 1:
            raise ValueError("the ranks of process_group passed heads of different dtypes: every rank's hidden, "
                             "weight (and reference head) must have the same dtype")
        for col, what in ((1, "the row counts of hidden"), (2, "the hidden sizes D"),
                          (3, "the numbers of valid targets"), (4, "the targets (checksums)")):
            if len({row[col] for row in every}) != 1:
                raise ValueError(f"vocabulary-parallel heads need the same hidden states and targets on every rank "
                                 f"of process_group; {what} differ across ranks "
                                 f"({[row[col] for row in every]}). Ranks that hold different data (data "
                                 "parallel, FSDP) must not pass process_group: gather the head instead")
        if len(every) > 1 and len({(row[0], row[7]) for row in every}) == 1 and every[0][0] > 0:
            raise ValueError(f"every rank of process_group holds the same weight rows (V_r = {every[0][0]} on each, "
                             "identical): pass each rank its own vocabulary shard weight[offset_r:offset_r + V_r] "
                             "(and bias, reference head alike), or no process_group for a replicated head; with the "
                             "whole head on every rank the log-probs would be off by log(world size)")
        shard = cls(group, [row[0] for row in every])
        if shard.vocab >= _EXACT_IDS:
            raise ValueError(f"vocabulary-parallel heads support V < 2^24, got V={shard.vocab}")
        return shard

    @classmethod
    def from_sizes(cls, name: str, sizes: torch.Tensor):
        return cls(_group(name), sizes.tolist())

    def sizes_tensor(self, device) -> torch.Tensor:
        return torch.tensor(self.sizes, dtype=torch.int64, device=device)

    def check_range(self, targets: torch.Tensor, ignore_index: int):
        err = range_error(targets, self.vocab, ignore_index)
        if err is not None:
            raise err

    def local_targets(self, y: torch.Tensor, absent: int) -> torch.Tensor:
        """Global ids -> ids in this shard, `absent` where another rank owns the target."""
        own = (y >= self.offset) & (y < self.offset + self.size)
        return torch.where(own, y - self.offset, absent)

    def merge(self, planes: torch.Tensor, arg: torch.Tensor | None, div=None):
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
