"""The call spec: everything about one fused head call that is not a tensor.

A `HeadCall` is built once, where the user's options enter (fusedpref/functions.py), and carried
unchanged through the pipeline (fusedpref/_library.py), both backends (fusedpref/ops.py,
fusedpref/chunked.py) and the vocabulary shards (fusedpref/distributed.py). The torch.library
custom ops take it as flat scalars: `op_args` / `from_op_args` are the only place it is flattened.

The tensors travel as `Head` bundles (one linear head's operands and its logit transform).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple, Optional

import torch

Backend = Literal["auto", "triton", "torch"]
FrozenMode = Literal["auto", "one-pass", "standard"]
FROZEN_MODES = ("auto", "one-pass", "standard")


class Divergence(enum.IntEnum):
    """The divergence between the policy head (p) and the reference head (q) of a two-head call.
    The values are the kernels' constexprs (kernels/modes.py)."""
    FORWARD_KL = 0      # KL(q || p): TRL's forward KL, EXPO's KL(pi_ref || pi_theta)
    REVERSE_KL = 1      # KL(p || q)
    JSD = 2             # mix KL(q || m) + (1 - mix) KL(p || m),  m = (1 - mix) p + mix q


@dataclass(frozen=True)
class Transform:
    """One head's logit transform: z = softcap tanh((h W^T + b) / softcap), then z * scale (a
    temperature T is a scale 1 / T). None = off."""
    softcap: Optional[float] = None
    scale: Optional[float] = None


@dataclass(frozen=True)
class HeadCall:
    """One fused head call: which heads, which outputs, which path."""
    policy: Transform = Transform()
    ref: Optional[Transform] = None     # the reference head's transform; None: a one-head call
    divergence: Divergence = Divergence.FORWARD_KL   # two heads only
    mix: float = 0.0                    # the JSD's mixture weight (Divergence.JSD only)
    ignore_index: int = -100
    backend: str = "torch"              # "triton" | "torch" (resolved from "auto" before the call)
    logp: bool = True                   # the target log-probs (two heads: both heads')
    stats: bool = False                 # the policy's statistics [n, 4]
    frozen: str = "auto"                # FrozenMode; resolved to one_pass in the autograd forward
    one_pass: bool = False              # frozen policy head: the forward accumulates dlogp/dh (and dKL/dh)
    group: Optional[str] = None         # vocabulary-parallel: the torch.distributed group's name
    reduce_hidden_grad: bool = True     # with group: all_reduce dH over it
    grad_filter: float = 0.0            # > 0: skip the dH, dW products of dz blocks below it (0: exact)

    @property
    def two_heads(self) -> bool:
        return self.ref is not None

    @property
    def jsd(self) -> bool:
        return self.two_heads and self.divergence == Divergence.JSD

    def one_pass_possible(self) -> bool:
        """The one-pass frozen path serves the log-probs and the forward KL (README "Frozen head")."""
        return not self.two_heads or self.divergence == Divergence.FORWARD_KL

    def resolve_frozen(self, frozen_head: bool) -> "HeadCall":
        """The path for a policy head that is (or is not) frozen: hidden requires grad, the weight
        and bias do not."""
        if self.frozen == "one-pass":
            if not frozen_head:
                raise ValueError("frozen='one-pass' needs a frozen head: hidden requires grad and weight (and bias) "
                                 "do not; use frozen='auto'")
            if not self.one_pass_possible():
                raise ValueError(f"frozen='one-pass' serves the log-probs and the forward KL, not "
                                 f"{self.divergence.name}; use frozen='auto'")
        one_pass = frozen_head and self.frozen != "standard" and self.one_pass_possible()
        return self if one_pass == self.one_pass else replace(self, one_pass=one_pass)

    def op_args(self) -> tuple:
        """The custom ops' flat form of the call (OP_ARGS names it; from_op_args is its inverse).
        The frozen mode is not in it: by then one_pass has been resolved."""
        ref = self.ref or Transform()
        return (self.policy.softcap, self.policy.scale, self.two_heads, ref.softcap, ref.scale, int(self.divergence),
                self.mix, self.ignore_index, self.backend, self.logp, self.stats, self.one_pass, self.group,
                self.reduce_hidden_grad, self.grad_filter)

    @staticmethod
    def from_op_args(args: tuple) -> "HeadCall":
        (softcap, scale, two_heads, ref_softcap, ref_scale, divergence, mix, ignore_index, backend, logp, stats,
         one_pass, group, reduce_hidden_grad, grad_filter) = args
        return HeadCall(Transform(softcap, scale), Transform(ref_softcap, ref_scale) if two_heads else None,
                        Divergence(divergence), mix, ignore_index, backend, logp, stats, "auto", one_pass, group,
                        reduce_hidden_grad, grad_filter)


# the custom ops' scalar parameters, in op_args order (fusedpref/_library.py spells them out)
OP_ARGS = ("softcap", "scale", "two_heads", "ref_softcap", "ref_scale", "divergence", "mix", "ignore_index",
           "backend", "logp", "stats", "one_pass", "group", "reduce_hidden_grad", "grad_filter")


class Head(NamedTuple):
    """One linear head's operands: hidden [n, D], weight [V, D], bias [V] or None, and its
    logit transform."""
    h: torch.Tensor
    w: torch.Tensor
    b: Optional[torch.Tensor]
    xf: Transform


class Needs(NamedTuple):
    """Which gradients of the policy head are wanted."""
    h: bool
    w: bool
    b: bool


class LossRows(NamedTuple):
    """How the flat rows of a loss computed in the fused pass group into sequences and units:
    seq [n] the sequence of each row; units [U, k] the sequences of each unit that has one loss
    term (a preference pair: (i, i + B); a KTO sequence: (i,)), in unit order; n_seq sequences;
    weight [n] each row's weight in its sequence's log-prob (None: 1; LD-DPO's ld_alpha tail)."""
    seq: torch.Tensor
    units: torch.Tensor
    n_seq: int
    weight: Optional[torch.Tensor] = None


class SeqSums(NamedTuple):
    """Per-sequence sums [S] of a fused loss pass (of the units done so far; 0 elsewhere): the
    weighted log-prob, the reference's and the KL (two heads; else None), the statistics [S, 4]
    and the unweighted log-prob (the same tensor as logp without row weights)."""
    logp: torch.Tensor
    ref_logp: Optional[torch.Tensor]
    kl: Optional[torch.Tensor]
    stats: torch.Tensor
    raw_logp: torch.Tensor
