"""Gradients in forward (README "Gradients in forward"): preference_loss and kto_loss compute their
gradients inside the fused pass by default (6 N D V for a trainable head), equal to the recompute
path under the suite's rule against the float64 oracle for every decomposable loss type and option,
both backends, one and many chunks of pairs (and a pair too large for the kept budget, which takes
two passes), ignored rows, uneven pairs, bias, soft-cap and scale; the path is taken exactly where it
applies, and clear errors where it cannot."""
import pytest
import torch

import fusedpref
from fusedpref import _library
from fusedpref.losses import LOSSES
from helpers import DEVICE, assert_within, matmul_flops
from test_losses import NEEDS_LS, PARAM_CASES, RECOMPUTE_ONLY, _batch, _compare

BACKENDS = ["torch", "triton"]
DECOMPOSABLE = sorted(t for t, spec in LOSSES.items() if spec.decomposable and t not in ("typo", "expo"))
# kept budgets: everything in one chunk, chunks of a few pairs, every pair too large (two passes)
KEPT = {"one-chunk": None, "pair-chunks": 0.006, "two-pass": 0.0005}   # _batch: pairs of 14, 8, 8 rows


@pytest.fixture
def taken(monkeypatch):
    """Counts the fused-loss pipeline's calls and its chunks' routes (kept or two-pass)."""
    calls = {"fused": 0, "kept": 0, "two-pass": 0}
    original, chunks = _library.fused_loss, _library._unit_chunks

    def fused(*a, **k):
        calls["fused"] += 1
        return original(*a, **k)

    def unit_chunks(*a, **k):
        out = chunks(*a, **k)
        for _, _, kept in out:
            calls["kept" if kept else "two-pass"] += 1
        return out
    monkeypatch.setattr(_library, "fused_loss", fused)
    monkeypatch.setattr(_library, "_unit_chunks", unit_chunks)
    return calls


def _routes(fast=(("one-chunk", "torch"), ("one-chunk", "triton"), ("pair-chunks", "torch"))):
    """(kept, backend) pairs; the fast tier runs the `fast` ones, the slow tier the rest (the Triton
    interpreter's multi-chunk and two-pass runs, ...)."""
    return [pytest.param(k, b, marks=() if (k, b) in fast else pytest.mark.slow, id=f"{k}-{b}")
            for k in KEPT for b in BACKENDS]


@pytest.mark.parametrize("kept,backend", _routes(fast=(("one-chunk", "torch"), ("one-chunk", "triton"))))
@pytest.mark.parametrize("loss_type", DECOMPOSABLE)
def test_every_decomposable_loss_matches_the_oracle(loss_type, kept, backend, taken):
    """(EXPO's exact KL: test_expo_in_one_pass below.)"""
    _compare(backend, loss_type, label_smoothing=NEEDS_LS.get(loss_type, 0.0),
             fused_kw=dict(grad_in_forward=True, kept_mb=KEPT[kept]))
    assert taken["fused"] == 1
    assert taken["two-pass" if kept == "two-pass" else "kept"] >= 1
    assert (taken["kept"] > 1) == (kept == "pair-chunks")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
@pytest.mark.parametrize("loss_type,kw", [c for c in PARAM_CASES if c[0] not in ("aot", "aot_unpaired")
                                           and c not in RECOMPUTE_ONLY], ids=lambda x: str(x).replace(" ", ""))
def test_every_loss_parameter_matches_the_oracle(loss_type, kw, backend, taken):
    _compare(backend, loss_type, fused_kw=dict(grad_in_forward=True, kept_mb=0.006), **kw)
    assert taken["fused"] == 1


@pytest.mark.parametrize("loss_type,kw", [c for c in PARAM_CASES if "ld_alpha" in c[1] or "use_weighting" in c[1]],
                         ids=lambda x: str(x).replace(" ", ""))
def test_ld_alpha_and_wpo_on_the_recompute_path(loss_type, kw, taken):
    """The same options forced onto the recompute path; with an NLL term it is the default, and
    grad_in_forward=True says why it cannot apply."""
    _compare("torch", loss_type, fused_kw=dict(grad_in_forward=False), **kw)
    assert taken["fused"] == 0
    if (loss_type, kw) in RECOMPUTE_ONLY:
        _compare("torch", loss_type, **kw)
        assert taken["fused"] == 0
        with pytest.raises(ValueError, match="NLL term .* needs every pair"):
            _compare("torch", loss_type, fused_kw=dict(grad_in_forward=True), **kw)


@pytest.mark.parametrize("kept,backend", _routes())
@pytest.mark.parametrize("opts", [dict(), dict(average_log_prob=True, expo_kl_on="chosen"),
                                  dict(expo_kl="sequence")], ids=["both", "avg-chosen", "sequence-estimator"])
def test_expo_in_one_pass(opts, kept, backend, taken):
    """EXPO's exact KL: the policy's and the reference's logits once each, kept (P and Q), the KL's
    gradient g (p - q) built into dz with the Bradley-Terry term's."""
    h0, w0, b0, y, rh, rw = _batch(seed=2)
    kw = dict(loss_type="expo", beta=0.4, softcap=5.0, **opts)
    refs = dict(ref_logps=fusedpref.reference_logps(rh, rw, y, softcap=5.0)) if opts.get("expo_kl") == "sequence" \
        else dict(ref_hidden=rh, ref_weight=rw)

    def run(gif, dtype=torch.float32, fn=fusedpref.preference_loss):
        h, w, b = (t.detach().to(dtype).requires_grad_() for t in (h0, w0, b0))
        r = {k: v.to(dtype) for k, v in refs.items()}
        extra = dict(backend=backend, grad_in_forward=gif, kept_mb=KEPT[kept]) if fn is fusedpref.preference_loss \
            else {}
        if fn is not fusedpref.preference_loss:
            from trl_reference import trl_loss
            fn = trl_loss
        loss, metrics = fn(h, w, y, bias=b, **kw, **r, **extra)
        return loss, metrics, torch.autograd.grad(loss, (h, w, b))

    fused, recompute = run(True), run(False)
    from trl_reference import trl_loss
    oracle = run(None, torch.float64, trl_loss)
    assert taken["fused"] == 1
    assert_within("loss", fused[0], recompute[0], oracle[0], torch.float32)
    for k in oracle[1]:
        assert_within(k, fused[1][k], recompute[1][k], oracle[1][k], torch.float32)
    for name, f, r, o in zip(("dH", "dW", "db"), fused[2], recompute[2], oracle[2]):
        assert_within(name, f, r, o, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kept", ["one-chunk", "two-pass"])
@pytest.mark.parametrize("opts", [dict(), dict(average_log_prob=True, desirable_weight=1.3), dict(kl=True)],
                         ids=["plain", "avg-weights", "kl-estimate"])
def test_kto_in_one_pass(opts, kept, backend, taken):
    from trl_reference import eager_kto_loss

    h0, w0, b0, y, rh, rw = _batch(seed=4)
    labels = torch.tensor([True, False, True, True, False, True], device=DEVICE)
    opts = dict(opts)
    kl = dict(kl_hidden=rh, ref_kl_hidden=h0, kl_targets=y) if opts.pop("kl", False) else {}

    def run(fn, dtype, **extra):
        h, w = (t.detach().to(dtype).requires_grad_() for t in (h0, w0))
        kld = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in kl.items()}
        loss, metrics = fn(h, w, y, labels, beta=0.3, ref_hidden=rh.to(dtype), ref_weight=rw.to(dtype), **kld,
                           **opts, **extra)
        return loss, metrics, torch.autograd.grad(loss, (h, w))

    fused = run(fusedpref.kto_loss, torch.float32, backend=backend, grad_in_forward=True, kept_mb=KEPT[kept])
    recompute = run(fusedpref.kto_loss, torch.float32, backend=backend, grad_in_forward=False)
    oracle = run(eager_kto_loss, torch.float64)
    assert taken["fused"] == 1
    assert_within("loss", fused[0], recompute[0], oracle[0], torch.float32)
    for k in oracle[1]:
        assert_within(k, fused[1][k], recompute[1][k], oracle[1][k], torch.float32)
    for name, f, r, o in zip(("dH", "dW"), fused[2], recompute[2], oracle[2]):
        assert_within(name, f, r, o, torch.float32)


def test_the_default_takes_it_exactly_where_it_applies(taken):
    h, w, b, y, rh, rw = _batch()
    ref = dict(ref_logps=torch.randn(y.shape[0], device=DEVICE) - 20)
    cases = {
        "trainable": (dict(), True),
        "no grad": (dict(no_grad=True), False),
        "frozen head (one-pass path)": (dict(frozen=True), False),
        "aot (couples the batch)": (dict(loss_type="aot"), False),
        "reduction none": (dict(reduction="none"), False),
        "forced off": (dict(grad_in_forward=False), False),
    }
    got = {}
    for name, (kw, _) in cases.items():
        kw = dict(kw)
        taken["fused"] = 0
        hh, ww = h.clone().requires_grad_(not kw.pop("no_grad", False)), w.clone()
        ww.requires_grad_(hh.requires_grad and not kw.pop("frozen", False))
        loss, _ = fusedpref.preference_loss(hh, ww, y, backend="torch", **ref, **kw)
        got[name] = taken["fused"] == 1
    assert got == {k: v for k, (_, v) in cases.items()}


@pytest.mark.parametrize("kw, words", [
    (dict(loss_type="aot"), "couples the pairs"),
    (dict(loss_type="aot_unpaired"), "couples the pairs"),
    (dict(reduction="none"), "reduction='none'"),
    (dict(grad_in_forward=1), "grad_in_forward must be None, True or False"),
    (dict(kept_mb=0), "kept_mb must be a positive number"),
])
def test_where_it_cannot_apply_asking_for_it_is_a_clear_error(kw, words):
    h, w, b, y, rh, rw = _batch()
    kw = {"grad_in_forward": True, **kw}
    with pytest.raises((ValueError, TypeError), match=words.replace("(", r"\(").replace(")", r"\)")):
        fusedpref.preference_loss(h.requires_grad_(), w.requires_grad_(), y, ref_logps=torch.zeros(y.shape[0]),
                                  backend="torch", **kw)


def _flops(fn):
    return matmul_flops(fn)


@pytest.mark.parametrize("case, bound", [("precomputed", 6.2), ("reference head", 8.2), ("expo", 8.2)])
def test_flops_per_valid_token(case, bound):
    """The issue's bounds, FlopCounterMode on the torch backend: 6 N D V with precomputed reference
    log-probs (2 logits + 2 dW + 2 dH), 8 with a reference head (+ its logits) and for EXPO (2 + 2
    logits, 2 + 2), against 8, 10 and 12 on the recompute path."""
    g = torch.Generator().manual_seed(0)
    b_, t, d, v = 4, 16, 32, 500
    h = torch.randn(2 * b_, t, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    y = torch.randint(0, v, (2 * b_, t), generator=g)
    y[:, :6] = -100
    rh, rw = torch.randn(2 * b_, t, d, generator=g), torch.randn(v, d, generator=g)
    kw = {"precomputed": dict(ref_logps=torch.randn(2 * b_, generator=g)),
          "reference head": dict(ref_hidden=rh, ref_weight=rw),
          "expo": dict(loss_type="expo", ref_hidden=rh, ref_weight=rw)}[case]
    nv = int((y != -100).sum())
    per_token = {}
    for gif in (True, False):
        out = {}
        fwd = _flops(lambda: out.setdefault("l", fusedpref.preference_loss(h, w, y, backend="torch",
                                                                          grad_in_forward=gif, **kw)[0]))
        bwd = _flops(lambda: out["l"].backward())
        per_token[gif] = (fwd + bwd) / (nv * d * v)
        if gif:
            assert bwd == 0                        # backward only scales the saved gradients
    assert per_token[True] <= bound, per_token
    assert per_token[False] - per_token[True] == pytest.approx(2.0 if case != "expo" else 4.0, abs=0.01)


def test_retain_graph_twice_accumulation_and_autocast():
    h0, w0, b0, y, rh, rw = _batch(seed=5)
    ref = dict(ref_hidden=rh, ref_weight=rw)

    def grads(gif, steps=1, twice=False, autocast=False):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss, _ = fusedpref.preference_loss(h, w, y, backend="torch", grad_in_forward=gif, **ref)
            loss.backward(retain_graph=twice)
            if twice:
                loss.backward()
        return loss.detach(), h.grad, w.grad

    for kw in (dict(twice=True), dict(steps=3), dict(autocast=True)):
        a, b = grads(True, **kw), grads(False, **kw)
        for x, z in zip(a, b):
            torch.testing.assert_close(x, z, rtol=2e-2 if kw.get("autocast") else 1e-5,
                                       atol=2e-2 if kw.get("autocast") else 1e-6)
        assert a[2].dtype == torch.float32            # fp32 master weights get fp32 gradients under autocast


def test_a_second_derivative_raises_clearly():
    h, w, b, y, rh, rw = _batch()
    h.requires_grad_()
    loss, _ = fusedpref.preference_loss(h, w.requires_grad_(), y, ref_logps=torch.zeros(y.shape[0]),
                                        backend="torch", grad_in_forward=True)
    gh, = torch.autograd.grad(loss, h, create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        gh.sum().backward()


def test_torch_compile_takes_the_recompute_path_with_its_numbers(taken):
    h0, w0, b0, y, rh, rw = _batch(seed=6)

    def step(h, w):
        return fusedpref.preference_loss(h, w, y, ref_hidden=rh, ref_weight=rw, backend="torch")[0]

    out = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        torch._dynamo.reset()
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        out.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert taken["fused"] == 1                      # eager took it; the compiled step recomputed
