"""The eager oracle: full logits, one copy shared by tests and the benchmark.

eager_logprobs(...) run on float64 copies of the inputs is the float64 oracle; run on the
inputs as they are it is "eager PyTorch in the same dtype" (TRL's way: logits in the input
dtype, upcast to fp32 before log_softmax).
"""
from __future__ import annotations

import torch


def eager_logits(hidden, weight, bias=None, softcap=None):
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = z.float() if z.dtype != torch.float64 else z
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def eager_logprobs(hidden, weight, targets, bias=None, ignore_index=-100, softcap=None):
    z = eager_logits(hidden, weight, bias, softcap)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logp = torch.log_softmax(z, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logp, torch.zeros_like(logp))


def eager_token_stats(hidden, weight, targets, bias=None, ignore_index=-100, softcap=None):
    """[..., 3] = (sum of logits over V, entropy, argmax == target), 0 on ignored rows."""
    z = eager_logits(hidden, weight, bias, softcap)
    valid = (targets != ignore_index).unsqueeze(-1)
    logp = torch.log_softmax(z, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    hit = (z.argmax(-1) == targets).to(z.dtype)
    out = torch.stack([z.sum(-1), entropy, hit], dim=-1)
    return torch.where(valid, out, torch.zeros_like(out))


def eager_kl(hidden, weight, ref_hidden, ref_weight, targets, bias=None, ref_bias=None,
             ignore_index=-100, softcap=None):
    """Per-token KL(p_ref || p_theta) over the full vocabulary, 0 on ignored rows."""
    lp = torch.log_softmax(eager_logits(hidden, weight, bias, softcap), dim=-1)
    lr = torch.log_softmax(eager_logits(ref_hidden, ref_weight, ref_bias, softcap), dim=-1)
    kl = (lr.exp() * (lr - lp)).sum(-1)
    return torch.where(targets != ignore_index, kl, torch.zeros_like(kl))


def as_float64(*tensors):
    return tuple(None if t is None else t.detach().double().requires_grad_(t.requires_grad)
                 for t in tensors)
