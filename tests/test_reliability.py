"""What a user's first week finds: each finding of the reliability issue, numbered as there, with
a test that failed before the fix. Shapes of the report: hidden [4, 8, 64] fp32 requiring grad,
weight [1000, 64], targets [4, 8] with some -100, ref_logps [4]."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fusedpref
from helpers import DEVICE, assert_within
from fusedpref.losses import log1mexp
from fusedpref.reference import as_float64, eager_kl, eager_logprobs, eager_preference_loss


def _report(seed=0, v=1000):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 8, 64, generator=g)
    head = torch.nn.Linear(64, v, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, 64, generator=g) / 8)
    y = torch.randint(0, v, (4, 8), generator=g)
    y[:, :3] = -100
    return x.to(DEVICE), head.to(DEVICE), y.to(DEVICE), torch.randn(4, generator=g).to(DEVICE) - 20


# 1. autocast ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_1_autocast_behaves_as_f_linear(backend):
    """Under bf16 autocast: operands in bf16 (as F.linear there), fp32 master weights get fp32
    gradients, and the result matches an eager loss computed under the same autocast."""
    x, head, y, ref = _report()
    lin = torch.nn.Linear(64, 64).to(DEVICE)
    results = []
    for fused in (True, False):
        lin.zero_grad()
        head.zero_grad()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            h = lin(x)
            assert h.dtype == torch.bfloat16 and head.weight.dtype == torch.float32
            if fused:
                loss, _ = fusedpref.preference_loss(h, head.weight, y, ref_logps=ref, backend=backend)
            else:
                loss, _ = eager_preference_loss(h, head.weight.to(torch.bfloat16), y, loss_type="sigmoid",
                                                beta=0.1, ref_logps=ref)
        loss.backward()
        results.append((loss.detach().float(), head.weight.grad.clone(), lin.weight.grad.clone()))
    (loss, dw, dl), (e_loss, e_dw, e_dl) = results
    assert dw.dtype == torch.float32 and dl.dtype == torch.float32
    torch.testing.assert_close(loss, e_loss, rtol=2e-2, atol=2e-2)
    assert (dw - e_dw).abs().max() <= 0.05 * e_dw.abs().max() and (dl - e_dl).abs().max() <= 0.05 * e_dl.abs().max()
    # outside autocast, mismatched dtypes still raise
    with pytest.raises(TypeError, match="weight dtype torch.float32 must equal hidden dtype torch.bfloat16"):
        fusedpref.preference_loss(x.bfloat16(), head.weight, y, ref_logps=ref, backend=backend)


def test_1_autocast_primitives_and_reference_head():
    x, head, y, _ = _report()
    w = head.weight.detach().clone().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        logp = fusedpref.linear_logprobs(x, w, y, backend="torch")
        kl = fusedpref.linear_kl(x, w, x + 0.1, w.detach() * 1.1, y, backend="torch")
    (logp.sum() + kl.sum()).backward()
    assert w.grad.dtype == torch.float32
    oracle = eager_logprobs(x.bfloat16().double(), w.bfloat16().double(), y)
    assert (logp.double() - oracle).abs().max() < 1e-4     # bf16 operands, fp32 accumulation


# 2. the statistics carry their exact gradients (none is silently dropped) ----------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_2_stats_have_exact_gradients(backend):
    """Every column of the statistics is differentiable with its true derivative (the argmax
    hit's is 0), in both Functions that return them: against the float64 oracle's autograd."""
    from fusedpref.reference import eager_token_stats

    x, head, y, _ = _report()
    g = torch.randn(*y.shape, 4, generator=torch.Generator().manual_seed(1))
    w0 = head.weight.detach()
    he, we = x.double().requires_grad_(), w0.double().requires_grad_()
    want = torch.autograd.grad((eager_token_stats(he, we, y) * g.double()).sum(), (he, we))
    for fn in ("logprobs", "logprobs_kl"):
        h, w = x.clone().requires_grad_(), w0.clone().requires_grad_()
        if fn == "logprobs":
            _, stats = fusedpref.LinearLogProbs.apply(h, w, y, None, -100, None, backend, True)
        else:
            *_, stats = fusedpref.LinearLogProbsKL.apply(h, w, x, w0, y, None, None, -100, None, backend, True)
        assert stats.requires_grad
        got = torch.autograd.grad((stats * g).sum(), (h, w))
        for name, a, b in zip(("dH", "dW"), got, want):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=f"{fn} {name}")


# 3. reference heads ----------------------------------------------------------------------------

def test_3_reference_head_of_another_vocabulary_or_hidden_size_is_rejected():
    x, head, y, _ = _report()
    h, w = torch.cat([x, x]), head.weight
    y2 = torch.cat([y, y])
    with pytest.raises(ValueError, match=r"ref_weight has V=999 but weight has V=1000"):
        fusedpref.preference_loss(h, w, y2, ref_hidden=h, ref_weight=w[:-1], backend="torch")
    with pytest.raises(ValueError, match=r"ref_weight has D=64 but ref_hidden has D=63"):
        fusedpref.preference_loss(h, w, y2, ref_hidden=h[..., :63], ref_weight=w, backend="torch")
    with pytest.raises(ValueError, match=r"ref_weight has V=999"):
        fusedpref.kto_loss(x, w, y, torch.tensor([True, False, True, False], device=DEVICE), ref_hidden=x,
                           ref_weight=w[:-1], backend="torch")
    with pytest.raises(ValueError, match=r"ref_hidden"):
        fusedpref.reference_logps(x[..., :63], w, y, backend="torch")


# 4. integer targets ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64], ids=str)
def test_4_every_integer_target_dtype(dtype):
    x, head, _, _ = _report(v=100)
    y = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ii = 255 if dtype == torch.uint8 else -100
    y[:, :2] = ii
    want = fusedpref.linear_logprobs(x, head.weight, y.long(), ignore_index=ii, backend="torch")
    got = fusedpref.linear_logprobs(x, head.weight, y.to(dtype), ignore_index=ii, backend="torch")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got[:, :2] == 0).all()
    yt = y.to(dtype).clone()
    loss, _ = fusedpref.preference_loss(torch.cat([x, x]), head.weight, torch.cat([yt, yt]), loss_type="simpo",
                                        ignore_index=ii, backend="torch")
    assert torch.isfinite(loss) and torch.equal(yt, y.to(dtype))     # the caller's tensor is untouched
    bad = y.to(dtype).clone()
    bad[0, 5] = 120 if dtype != torch.uint8 else 200
    with pytest.raises(ValueError, match=r"found (120|200)"):
        fusedpref.linear_logprobs(x, head.weight, bad, ignore_index=ii, backend="torch")


# 5. degenerate batches ----------------------------------------------------------------------------

def test_5_empty_batch_is_an_error():
    w = torch.randn(50, 8, device=DEVICE)
    with pytest.raises(ValueError, match="no sequences"):
        fusedpref.preference_loss(torch.randn(0, 4, 8, device=DEVICE), w, torch.zeros(0, 4, dtype=torch.long,
                                  device=DEVICE), ref_logps=torch.zeros(0, device=DEVICE))
    with pytest.raises(ValueError, match="no sequences"):
        fusedpref.kto_loss(torch.randn(0, 4, 8, device=DEVICE), w, torch.zeros(0, 4, dtype=torch.long, device=DEVICE),
                           torch.zeros(0, dtype=torch.bool, device=DEVICE), ref_logps=torch.zeros(0, device=DEVICE))


def test_5_a_sequence_without_completion_tokens_warns_and_gives_the_documented_value():
    x, head, y, ref = _report()
    h, yy = torch.cat([x, x]), torch.cat([y, y])
    yy[5] = -100                      # the rejected sequence of pair 1: truncated away
    refs = torch.cat([ref, ref])
    with pytest.warns(UserWarning, match=r"1 of 8 preference sequences have no completion tokens.*rows \[5\]"):
        loss, _ = fusedpref.preference_loss(h, head.weight, yy, loss_type="ipo", ref_logps=refs, backend="torch",
                                            reduction="none")
    # documented: its log-prob is 0 and its length counts as 1
    want, _ = eager_preference_loss(h.double(), head.weight.double(), yy, loss_type="ipo", beta=0.1,
                                    ref_logps=refs.double(), reduction="none")
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fusedpref.preference_loss(h, head.weight, torch.cat([y, y]), loss_type="ipo", ref_logps=refs,
                                  backend="torch")


def test_5_and_12_orpo_is_finite_at_and_near_log_prob_zero():
    # a one-word vocabulary: every log-prob is exactly 0 (TRL's log1p(-exp(x)) gives NaN here)
    h = torch.randn(4, 3, 5, device=DEVICE, requires_grad=True)
    w = torch.randn(1, 5, device=DEVICE, requires_grad=True)
    y = torch.zeros(4, 3, dtype=torch.long, device=DEVICE)
    loss, _ = fusedpref.preference_loss(h, w, y, loss_type="orpo", backend="torch")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    # the mean log-prob in (-6e-8, 0): log1mexp keeps its digits and gradient
    x = torch.tensor([-3e-8, -1e-7, -0.5, -5.0, -40.0], dtype=torch.float32, requires_grad=True)
    got = log1mexp(x)
    got.sum().backward()
    xd = x.detach().double()
    want = torch.log(-torch.expm1(xd))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad.double(), torch.exp(xd) / torch.expm1(xd), rtol=1e-4, atol=0)


# 6. clear errors instead of crashes -----------------------------------------------------------------

def test_6_zero_hidden_size():
    with pytest.raises(ValueError, match="hidden must have a hidden size D >= 1"):
        fusedpref.linear_logprobs(torch.randn(3, 0), torch.randn(10, 0), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_6_double_backward_raises_clearly(backend):
    x, head, y, _ = _report()
    h = x.clone().requires_grad_()
    logp = fusedpref.linear_logprobs(h, head.weight, y, backend=backend)
    g, = torch.autograd.grad(logp.sum(), h, create_graph=True)
    assert torch.isfinite(g).all()
    with pytest.raises(RuntimeError, match="double backward"):
        g.pow(2).sum().backward()


def test_6_numpy_ignore_index_and_kto_messages():
    x, head, y, _ = _report()
    a = fusedpref.linear_logprobs(x, head.weight, y, ignore_index=np.int64(-100), backend="torch")
    torch.testing.assert_close(a, fusedpref.linear_logprobs(x, head.weight, y, backend="torch"))
    labels = torch.tensor([True, False, True, False], device=DEVICE)
    with pytest.raises(ValueError, match="fused KL estimate runs the reference head"):
        fusedpref.kto_loss(x, head.weight, y, labels, ref_logps=torch.zeros(4, device=DEVICE), kl_hidden=x,
                           ref_kl_hidden=x, kl_targets=y, backend="torch")


# 7. hyperparameters that did nothing or made no sense ------------------------------------------------

def test_7_silently_accepted_hyperparameters_are_rejected():
    x, head, y, ref = _report()
    h, yy, refs = torch.cat([x, x]), torch.cat([y, y]), torch.cat([ref, ref])
    with pytest.raises(ValueError, match=r"label_smoothing=0.1 has no effect on loss_type \['hinge'\]"):
        fusedpref.preference_loss(h, head.weight, yy, loss_type="hinge", label_smoothing=0.1, ref_logps=refs)
    with pytest.raises(ValueError, match="gamma must be >= 0, got -5"):
        fusedpref.preference_loss(h, head.weight, yy, loss_type="simpo", gamma=-5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fusedpref.FusedLinearPreferenceLoss(reduction="bad")


# 9. float64 and gradcheck -----------------------------------------------------------------------------

def _f64_head(n=(2, 3), d=5, v=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    b = (torch.randn(v, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    y = torch.randint(0, v, n, generator=g)
    y[0, 0] = -100
    return h, w, b, y


def test_9_gradcheck_of_the_three_primitives_in_float64():
    h, w, b, y = _f64_head()
    rh = torch.randn(2, 3, 4, dtype=torch.float64)
    rw = torch.randn(7, 4, dtype=torch.float64)
    assert fusedpref.linear_logprobs(h, w, y, bias=b).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda h, w, b: fusedpref.linear_logprobs(h, w, y, bias=b, softcap=3.0),
                                    (h, w, b))
    assert torch.autograd.gradcheck(lambda h, w, b: fusedpref.linear_kl(h, w, rh, rw, y, bias=b), (h, w, b))
    assert torch.autograd.gradcheck(
        lambda h, w, b: torch.stack(fusedpref.linear_logprobs_kl(h, w, rh, rw, y, bias=b)[::2]), (h, w, b))
    with pytest.raises(TypeError, match="float64 .* runs on backend='torch'"):
        fusedpref.linear_logprobs(h, w, y, backend="triton")


@pytest.mark.parametrize("loss_type,kw", [("sigmoid", {}), ("simpo", {}), ("orpo", {}), ("expo", {}),
                                          ("kto", {})])
def test_9_gradcheck_of_one_loss_of_each_family(loss_type, kw):
    h, w, b, y = _f64_head(n=(4, 3))
    y[:, 0] = -100
    rh = torch.randn(4, 3, 5, dtype=torch.float64)
    if loss_type == "kto":
        labels = torch.tensor([True, False, False, True])
        rw = w.detach().clone()          # outside f: gradcheck perturbs w in place

        def f(h, w, b):
            return fusedpref.kto_loss(h, w, y, labels, bias=b, ref_hidden=rh, ref_weight=rw)[0]
    else:
        refs = {"ref_hidden": rh, "ref_weight": w.detach() * 0.9} if fusedpref.LOSSES[loss_type].needs_ref else {}

        def f(h, w, b):
            return fusedpref.preference_loss(h, w, y, bias=b, loss_type=loss_type, beta=0.5, **refs, **kw)[0]
    assert torch.autograd.gradcheck(f, (h, w, b))


# 10. KL at large logits ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_10_kl_keeps_fp32_accuracy_at_logits_of_1e3(backend):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 7, 16, generator=g)
    w = torch.randn(300, 16, generator=g) * 60          # |z| ~ 1e3
    rh = h + 0.01 * torch.randn(2, 7, 16, generator=g)
    rw = w + 0.5 * torch.randn(300, 16, generator=g)
    y = torch.randint(0, 300, (2, 7), generator=g)
    h, w, rh, rw, y = (t.to(DEVICE) for t in (h, w, rh, rw, y))
    assert (h @ w.t()).abs().max() > 500
    fused = fusedpref.linear_kl(h, w, rh, rw, y, backend=backend)
    eager = eager_kl(h, w, rh, rw, y)
    oracle = eager_kl(*as_float64(h, w, rh, rw), y)
    assert_within("kl", fused, eager, oracle, torch.float32)


# 11. NLL over the true token count -------------------------------------------------------------------------

def test_11_nll_with_an_empty_chosen_completion_counts_real_tokens():
    x, head, y, _ = _report()
    h, yy = torch.cat([x, x]), torch.cat([y, y])
    yy[1] = -100                                       # chosen sequence 1 truncated away
    with pytest.warns(UserWarning, match="no completion tokens"):
        loss, _ = fusedpref.preference_loss(h, head.weight, yy, loss_type="sft", backend="torch")
    logp = eager_logprobs(h.double(), head.weight.double(), yy)
    mask = yy != -100
    want = -(logp[:4] * mask[:4]).sum() / mask[:4].sum()     # TRL's sft / Liger: valid tokens only
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)


# 13 / 14. ORPOTrainer's NLL targets, average_log_prob -----------------------------------------------------

def test_13_nll_targets_take_the_nll_over_prompt_and_completion():
    x, head, y, _ = _report()
    h, yy = torch.cat([x, x]), torch.cat([y, y])
    full = torch.randint(0, 1000, (4, 8), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    loss, _ = fusedpref.preference_loss(h, head.weight, yy, loss_type="sft", nll_targets=full, backend="torch")
    want = -eager_logprobs(x.double(), head.weight.double(), full).mean()
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="nll_targets is used by the NLL term"):
        fusedpref.preference_loss(h, head.weight, yy, loss_type="simpo", nll_targets=full)


def test_14_average_log_prob_on_dpo_losses_and_kto():
    x, head, y, ref = _report()
    h, yy, refs = torch.cat([x, x]), torch.cat([y, y]), torch.cat([ref, ref])
    a, m = fusedpref.preference_loss(h, head.weight, yy, ref_logps=refs, average_log_prob=True, backend="torch")
    lens = (yy != -100).sum(-1).double()
    seq = eager_logprobs(h.double(), head.weight.double(), yy).sum(-1) / lens
    margin = (seq[:4] - refs[:4].double() / lens[:4]) - (seq[4:] - refs[4:].double() / lens[4:])
    torch.testing.assert_close(a.double(), -F.logsigmoid(0.1 * margin).mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m["logps/chosen"].double(), seq[:4].mean(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="already length-normalises"):
        fusedpref.preference_loss(h, head.weight, yy, loss_type="ipo", ref_logps=refs, average_log_prob=True)
    labels = torch.tensor([True, False, True, False], device=DEVICE)
    k, _ = fusedpref.kto_loss(x, head.weight, y, labels, ref_logps=ref / 5, average_log_prob=True, backend="torch")
    lr = seq[:4] - ref.double() / 5
    want = torch.where(labels, 1 - torch.sigmoid(0.1 * lr), 1 - torch.sigmoid(-0.1 * lr)).mean()
    torch.testing.assert_close(k.double(), want, rtol=1e-6, atol=1e-6)
    assert math.isfinite(k.item())
