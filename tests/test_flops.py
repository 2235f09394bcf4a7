"""The torch backend does exactly the FLOPs its derivation says (FlopCounterMode counts every
matmul): forward 2*Nv*D*V, backward 2 (recompute) + 2 (dW) + 2 (dH) times Nv*D*V; a frozen head
4*Nv*D*V in all on the one-pass path (forward 2 logits + 2 softmax-weighted W, backward none) and
on the standard path (frozen="standard": forward 2, backward 2 + 2) 6; ignored rows
(N - Nv of them) cost nothing."""
import pytest
import torch

import fusedpref
from helpers import matmul_flops

N, D, V = 64, 32, 500


def _count(fn):
    return matmul_flops(fn)


@pytest.mark.parametrize("frozen,path", [(False, "one-pass"), (True, "one-pass"), (True, "standard")],
                         ids=["trainable", "frozen-one-pass", "frozen-standard"])
def test_flops_follow_valid_rows(frozen, path):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=not frozen)
    y = torch.randint(0, V, (N,), generator=g)
    y[: N * 3 // 4] = -100          # 75% ignored, as prompts often are
    nv = int((y != -100).sum())
    out = {}
    fwd = _count(lambda: out.setdefault("logp", fusedpref.linear_logprobs(h, w, y, backend="torch",
                                                                             frozen="auto" if path == "one-pass"
                                                                             else path)))
    bwd = _count(lambda: out["logp"].backward(torch.randn(N, generator=g)))
    one_pass = frozen and path == "one-pass"
    assert fwd == (4 if one_pass else 2) * nv * D * V
    assert bwd == (0 if one_pass else 4 if frozen else 6) * nv * D * V
    assert (fwd + bwd) / (nv * D * V) == (4 if one_pass else 6 if frozen else 8)   # the issue: <= 4.2 frozen
    assert (w.grad is None) == frozen


def _expo_flops(trainable_head, frozen="auto"):
    """(forward FLOPs, backward FLOPs, Nv) of preference_loss(loss_type="expo") on the torch backend."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 16, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=trainable_head)
    rh, rw = torch.randn(4, 16, D, generator=g), torch.randn(V, D, generator=g)
    y = torch.randint(0, V, (4, 16), generator=g)
    y[:, :6] = -100
    out = {}
    fwd = _count(lambda: out.setdefault("loss", fusedpref.preference_loss(
        h, w, y, loss_type="expo", ref_hidden=rh, ref_weight=rw, backend="torch", frozen=frozen,
        grad_in_forward=False)[0]))      # the recompute path (gradients in forward: tests/test_grad_in_forward.py)
    bwd = _count(lambda: out["loss"].backward())
    return fwd, bwd, int((y != -100).sum())


def test_expo_vocab_reads_each_head_once_per_pass():
    """EXPO's exact-KL loss through preference_loss: the forward computes the policy and the
    reference logits once each (2 + 2), the backward recomputes both once (2 + 2) and does dW
    and dH (2 + 2): 12 * Nv * D * V in all (three separate primitives would do 22)."""
    fwd, bwd, nv = _expo_flops(True)
    # + the three row-wise dot products over V (E_ref[r - z] for the KL, E_p[z] for the entropy
    #   metric, sum p^2 for log_sum_sq_probs), which FlopCounterMode counts as einsums: 3 * (2 * Nv * V)
    assert fwd == 4 * nv * D * V + 6 * nv * V
    assert bwd == 8 * nv * D * V


@pytest.mark.parametrize("path", ["one-pass", "standard"])
def test_expo_pass_with_a_frozen_policy_head(path):
    """EXPO's pass with a frozen policy head (LoRA): one-pass forward = both heads' logits (2 + 2)
    and the two softmax-weighted sums of the policy's W rows, under p and p_ref (2 + 2), backward
    none: 8 * Nv * D * V; the standard path: forward 4, backward recompute 4 + dH 2 = 10."""
    fwd, bwd, nv = _expo_flops(False, path)
    matmul = 8 if path == "one-pass" else 4
    # + the row-wise dot products over V, counted as einsums (KL, entropy, sum p^2): 3 * (2 * Nv * V)
    assert fwd == matmul * nv * D * V + 6 * nv * V
    assert bwd == (0 if path == "one-pass" else 6 * nv * D * V)
