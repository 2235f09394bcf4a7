"""DTensor heads: turned, once per call, into what the fused heads take.

| weight (and bias, the reference head alike) | hidden | result |
|---|---|---|
| Shard(0) on a 1-D mesh | Replicate() on that mesh, or process_group = the mesh's group | tensor parallel: the local shards are the vocabulary shards (fusedpref/distributed.py) |
| Shard(0) on a 1-D mesh, no process_group | a plain tensor | FSDP2 (ranks hold different data): gathered once (full_tensor), the gradient reduce-scattered and averaged over the mesh |
| anything else | | a clear error |
"""
from __future__ import annotations

import sys

import torch.distributed as dist

def _placements(t):
    return tuple(t.placements) if _is_dtensor(t) else None


def _is_dtensor(t) -> bool:
    """A DTensor? (Without torch.distributed.tensor imported there can be none: not importing it
    here keeps sympy out of eager use.)"""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


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
    tensors = [t for pair in heads if pair is not None for t in pair if t is not None]
    if not _is_dtensor(hidden) and not any(_is_dtensor(t) for t in tensors):
        return hidden, heads, process_group
    from torch.distributed.tensor import Shard

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
