"""Preference losses: every loss type against an independent TRL-style float64 eager reference
(full logits), on both backends; gradcheck of the loss math; the reference paths; errors."""
import pytest
import torch

import fusedpref
from helpers import DEVICE, assert_within
from fusedpref.losses import LOSSES, Pairs
from trl_reference import trl_loss

B, T, D, V = 3, 9, 24, 97
NEEDS_LS = {"exo_pair": 1e-3, "robust": 0.1}
ALL = sorted(set(LOSSES) - {"expo", "typo"})   # EXPO has its own tests (test_expo.py)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * B, T, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.4
    bias = torch.randn(V, generator=g) * 0.3
    y = torch.randint(0, V, (2 * B, T), generator=g)
    # different prompt lengths (ignored at the start) and padding (ignored at the end): ~30%; the
    # rejected rows 2 tokens shorter than their chosen ones (completion lengths 8, 5, 5 vs 6, 3, 3), so
    # that a length-normalised loss that swaps them shows
    for i in range(2 * B):
        start = 1 + i % 3
        end = T - (i * 2) % 3 - (2 if i >= B else 0)
        y[i, :start] = -100
        y[i, end:] = -100
    ref_h = h + 0.3 * torch.randn(2 * B, T, D, generator=g)
    ref_w = w + 0.05 * torch.randn(V, D, generator=g)
    return [t.to(DEVICE) for t in (h, w, bias, y, ref_h, ref_w)]


def _kw(loss_type):
    return {"label_smoothing": NEEDS_LS.get(loss_type, 0.0)}


def test_registry_has_every_loss():
    trl_dpo = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
               "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}
    assert trl_dpo | {"simpo", "cpo", "orpo"} <= set(LOSSES)


def _compare(backend, loss_type, *, reduction="mean", seed=0, targets_dtype=torch.int64, ignore_index=-100,
             nll=False, fused_kw=None, **kw):
    """fused vs eager fp32 vs float64 oracle: loss, every metric, dH, dW, db under the rule (fused_kw:
    options of the fused call only, e.g. its path)."""
    h0, w0, b0, y, rh, rw = _batch(seed)
    if ignore_index != -100:
        y = torch.where(y == -100, torch.full_like(y, ignore_index), y)
    y = y.to(targets_dtype)
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    g_ref = dict(ref_hidden=rh, ref_weight=rw) if any(LOSSES[t].needs_ref for t in types) else {}
    extra = {}
    if nll:   # ORPOTrainer's NLL over prompt + completion: every position of the chosen rows
        nt = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(9)).to(DEVICE)
        nt[:, -1] = ignore_index
        extra["nll_targets"] = nt

    # the oracle takes the whole multiplier after the cap: a temperature T is logit_scale 1 / T
    oracle_kw = dict(kw)
    if "temperature" in oracle_kw:
        oracle_kw["logit_scale"] = oracle_kw.get("logit_scale", 1.0) / oracle_kw.pop("temperature")
        for ref_key in ("ref_logit_scale",):
            if ref_key in oracle_kw:
                oracle_kw[ref_key] = oracle_kw[ref_key] / kw["temperature"]

    def run(fn, dtype):
        h, w, b = (t.detach().to(dtype).requires_grad_() for t in (h0, w0, b0))
        refs = {k: v.to(dtype) for k, v in g_ref.items()}
        loss, metrics = fn(h, w, y, loss_type=loss_type, beta=0.7, bias=b, softcap=5.0, reduction=reduction,
                           ignore_index=ignore_index, **refs, **extra, **(kw if fn is not trl_loss else oracle_kw))
        g = torch.linspace(-1, 1, loss.numel(), dtype=dtype, device=DEVICE).view(loss.shape) + 1.5
        grads = torch.autograd.grad(loss, (h, w, b), g)   # a non-uniform upstream gradient for "none"
        return loss, metrics, grads

    fused = run(lambda *a, **k: fusedpref.preference_loss(*a, backend=backend, **(fused_kw or {}), **k),
                torch.float32)
    eager = run(trl_loss, torch.float32)
    oracle = run(trl_loss, torch.float64)
    assert fused[0].shape == oracle[0].shape == ((B,) if reduction == "none" else ())
    assert_within("loss", fused[0], eager[0], oracle[0], torch.float32)
    assert set(fused[1]) == set(oracle[1])
    for name, o in oracle[1].items():
        assert_within(name, fused[1][name], eager[1][name], o, torch.float32)
    for name, f, e, o in zip(["dH", "dW", "db"], fused[2], eager[2], oracle[2]):
        assert_within(name, f, e, o, torch.float32)
    assert fused[0].requires_grad
    return fused


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_type", ALL)
def test_loss_metrics_grads_match_trl_reference(loss_type, backend):
    _compare(backend, loss_type, **_kw(loss_type))


# every loss parameter away from its default, each against the independent reference
PARAM_CASES = [
    ("sigmoid", {"label_smoothing": 0.2}),
    ("exo_pair", {"label_smoothing": 0.1}),
    ("robust", {"label_smoothing": 0.2}),
    ("aot", {"label_smoothing": 0.3}),
    ("aot_unpaired", {"label_smoothing": 0.15}),
    ("simpo", {"label_smoothing": 0.1, "gamma": 1.3}),
    ("simpo", {"gamma": 0.0}),
    ("cpo", {"label_smoothing": 0.25, "alpha": 0.4}),
    ("cpo", {"alpha": 0.0}),
    ("discopop", {"discopop_tau": 0.3}),
    (["sigmoid", "sft"], {"loss_weights": [0.7, 0.3]}),
    (["ipo", "bco_pair", "hinge"], {"loss_weights": [1.0, 0.5, 2.0]}),
    (["simpo", "sft"], {"loss_weights": [1.0, 0.2], "gamma": 0.8}),
    ("sigmoid", {"average_log_prob": True}),
    ("hinge", {"average_log_prob": True}),
    ("apo_zero", {"average_log_prob": True}),
    ("nca_pair", {"average_log_prob": True}),
    ("sppo_hard", {"average_log_prob": True}),
    ("orpo", {"nll": True}),
    ("cpo", {"nll": True}),
    ("sft", {"nll": True}),
    ("sigmoid", {"ignore_index": 0}),             # a custom ignore_index (0 is also a vocabulary id)
    ("orpo", {"nll": True, "ignore_index": -1}),  # nll_targets with a custom ignore_index
    ("sigmoid", {"temperature": 0.7}),            # the transform options of the losses
    ("simpo", {"temperature": 1.6, "gamma": 0.8}),
    ("ipo", {"logit_scale": 0.8, "ref_softcap": 3.0, "ref_logit_scale": 1.25}),
    ("sigmoid_norm", {"temperature": 0.9, "ref_softcap": None}),
    ("ipo", {"targets_dtype": torch.int32}),
    ("simpo", {"targets_dtype": torch.int16}),
    # TRL's LD-DPO (ld_alpha) and WPO (use_weighting) options; with an NLL term they take the recompute path
    ("sigmoid", {"ld_alpha": 0.4}),
    (["ipo", "sigmoid_norm"], {"ld_alpha": 0.0}),
    ("sigmoid", {"use_weighting": True}),
    (["sigmoid", "ipo"], {"loss_weights": [1.0, 0.3], "use_weighting": True, "ld_alpha": 0.6}),
    (["sigmoid", "sft"], {"ld_alpha": 0.5}),
    (["hinge", "sft"], {"use_weighting": True}),
]
# the cases whose NLL term takes the recompute path (its gradient needs every pair first)
RECOMPUTE_ONLY = [c for c in PARAM_CASES if {"sft", "cpo", "orpo"} & set([c[0]] if isinstance(c[0], str) else c[0])
                  and ("ld_alpha" in c[1] or "use_weighting" in c[1])]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_type,kw", PARAM_CASES, ids=lambda x: str(x).replace(" ", ""))
def test_every_loss_parameter_matches_trl_reference(loss_type, kw, backend):
    _compare(backend, loss_type, **kw)


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("loss_type", ALL)
def test_every_reduction_matches_trl_reference(loss_type, reduction):
    _compare("torch", loss_type, reduction=reduction, **_kw(loss_type))


@pytest.mark.parametrize("loss_type", ALL)
def test_gradcheck_loss_math(loss_type):
    g = torch.Generator().manual_seed(1)
    b = 4
    lens = torch.tensor([3.0, 5.0, 2.0, 7.0], dtype=torch.float64)
    spec = LOSSES[loss_type]

    def f(c, r, rc, rr):
        p = Pairs(c, r, rc if spec.needs_ref else None, rr if spec.needs_ref else None, lens, lens.flip(0),
                  0.6, NEEDS_LS.get(loss_type, 0.0), dict(spec.params), nll=-c.sum() / lens.sum())
        return spec.fn(p)

    # log-probs of 2-7 tokens, strictly negative and distinct (aot sorts them)
    args = [(-(torch.rand(b, generator=g, dtype=torch.float64) * 3 + 0.5) - k).requires_grad_() for k in range(4)]
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_precomputed_and_fused_reference_agree(backend):
    h, w, b, y, rh, rw = _batch(seed=3)
    rh.requires_grad_()
    rw.requires_grad_()
    ref = fusedpref.reference_logps(rh, rw, y, softcap=5.0, backend=backend)
    assert ref.grad_fn is None and not ref.requires_grad and ref.shape == (2 * B,)
    hp = h.clone().requires_grad_()
    l1, m1 = fusedpref.preference_loss(hp, w, y, ref_hidden=rh, ref_weight=rw, softcap=5.0, backend=backend)
    l2, m2 = fusedpref.preference_loss(h.clone().requires_grad_(), w, y, ref_logps=ref, softcap=5.0,
                                       backend=backend)    # (the same policy path: a frozen head's one-pass)
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    for k in m1:
        torch.testing.assert_close(m1[k], m2[k], rtol=0, atol=0)
    l1.backward()
    assert rh.grad is None and rw.grad is None and hp.grad is not None


def test_reductions_and_weights():
    h, w, b, y, rh, rw = _batch(seed=4)
    kw = dict(ref_hidden=rh, ref_weight=rw, backend="torch")
    none, _ = fusedpref.preference_loss(h, w, y, reduction="none", **kw)
    mean, _ = fusedpref.preference_loss(h, w, y, reduction="mean", **kw)
    total, _ = fusedpref.preference_loss(h, w, y, reduction="sum", **kw)
    assert none.shape == (B,)
    torch.testing.assert_close(none.mean(), mean)
    torch.testing.assert_close(none.sum(), total)
    mix, _ = fusedpref.preference_loss(h, w, y, loss_type=["sigmoid", "sft"], loss_weights=[0.8, 0.2], **kw)
    sig, _ = fusedpref.preference_loss(h, w, y, loss_type="sigmoid", **kw)
    sft, _ = fusedpref.preference_loss(h, w, y, loss_type="sft", **kw)
    torch.testing.assert_close(mix, 0.8 * sig + 0.2 * sft)
    module = fusedpref.FusedLinearPreferenceLoss("sigmoid", beta=0.1, backend="torch")
    assert list(module.parameters()) == []
    torch.testing.assert_close(module(h, w, y, ref_hidden=rh, ref_weight=rw)[0], mean)


@pytest.mark.parametrize("kwargs, exc, words", [
    ({"loss_type": "dpo"}, ValueError, ["unknown loss_type 'dpo'", "sigmoid", "orpo"]),
    ({"loss_type": "exo_pair"}, ValueError, ["exo_pair", "label_smoothing > 0"]),
    ({"loss_type": "robust", "label_smoothing": 0.5}, ValueError, ["robust", "< 0.5"]),
    ({"loss_type": "sigmoid", "no_ref": True}, ValueError, ["needs a reference", "ref_logps"]),
    ({"loss_type": "sigmoid", "gamma": 1.0}, TypeError, ["gamma"]),
    ({"loss_type": "sigmoid", "beta": 0.0}, ValueError, ["beta"]),
    ({"loss_type": "sigmoid", "reduction": "avg"}, ValueError, ["reduction"]),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, ValueError, ["loss_weights"]),
    ({"loss_type": "sigmoid", "ref_logps_bad": True}, ValueError, ["ref_logps", "[2B]=[6]"]),
    ({"loss_type": "sigmoid", "odd": True}, ValueError, ["2B sequences"]),
])
def test_bad_loss_arguments(kwargs, exc, words):
    h, w, b, y, rh, rw = _batch()
    kwargs = dict(kwargs)
    ref = {"ref_logps": torch.zeros(2 * B, device=DEVICE)}
    if kwargs.pop("no_ref", False):
        ref = {}
    if kwargs.pop("ref_logps_bad", False):
        ref = {"ref_logps": torch.zeros(B, device=DEVICE)}
    if kwargs.pop("odd", False):
        h, y = h[:5], y[:5]
    with pytest.raises(exc) as info:
        fusedpref.preference_loss(h, w, y, backend="torch", **ref, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
