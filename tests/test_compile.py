"""torch.compile(fullgraph=True) of a training step that calls fusedpref (CPU inductor): the
primitives are torch.library custom ops with fake implementations, and validation never guards
on tensor data, so the whole step is one graph and gives eager's numbers."""
import pytest
import torch

import fusedpref
from helpers import DEVICE


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=211, d=32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.body = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.GELU(), torch.nn.LayerNorm(d))
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)

    def hidden(self, ids):
        return self.body(self.embed(ids))


def _batch(seed=0, vocab=211):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (4, 12), generator=g)
    targets = ids.roll(-1, 1)
    targets[:, :4] = -100             # prompt
    targets[1, 9:] = -100             # padding
    return ids.to(DEVICE), targets.to(DEVICE), (torch.randn(4, generator=g) - 30).to(DEVICE)


def _loss(model, ref_model, ids, targets, ref_logps, loss_type):
    """The compiled part of a step: model forward, fused head and loss (AOTAutograd compiles the
    backward graph of it too; .backward() itself is called outside, as in any compiled loop)."""
    h = model.hidden(ids)
    kw = {}
    if loss_type == "expo":
        kw = dict(ref_hidden=ref_model.hidden(ids).detach(), ref_weight=ref_model.lm_head.weight.detach())
    elif loss_type != "simpo":
        kw = dict(ref_logps=ref_logps)
    loss, metrics = fusedpref.preference_loss(h, model.lm_head.weight, targets, loss_type=loss_type, beta=0.2,
                                              backend="torch", **kw)
    return loss, metrics["rewards/margins"], metrics["entropy"]


def _step(fn, *args):
    loss, margins, entropy = fn(*args)
    loss.backward()
    return loss.detach(), margins, entropy


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo", "expo"])
def test_compiled_dpo_step_fullgraph_matches_eager(loss_type):
    torch.manual_seed(0)
    model, ref_model = TinyLM().to(DEVICE), TinyLM().to(DEVICE)
    ids, targets, ref_logps = _batch()
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model.zero_grad()
        fn = torch.compile(_loss, fullgraph=True) if compiled else _loss
        out = _step(fn, model, ref_model, ids, targets, ref_logps, loss_type)
        results.append((out, [p.grad.clone() for p in model.parameters()]))
    (eager, eager_grads), (comp, comp_grads) = results
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compiled_step_still_checks_target_range():
    torch._dynamo.reset()
    model = TinyLM().to(DEVICE)
    ids, targets, ref_logps = _batch()
    fn = torch.compile(_loss, fullgraph=True)
    _step(fn, model, None, ids, targets, ref_logps, "sigmoid")
    bad = targets.clone()
    bad[0, 6] = 500
    with pytest.raises(ValueError, match=r"targets must lie in \[0, V=211\).*found 500"):
        _step(fn, model, None, ids, bad, ref_logps, "sigmoid")
