"""Gradient filtering (README "Gradient filtering"): with grad_filter, a (16-row block x 128-column
tile) of dz whose largest |dz| relative to its rows' upstream gradients (for a plain head: the
softmax probabilities) is below the threshold skips its dH and dW products, on both paths; the
gradients are then exactly those of dz with those blocks zeroed, the FLOPs drop on a peaked head,
and a threshold below every probability gives the exact gradients."""
import sys
from pathlib import Path

import pytest
import torch

import fusedpref
from fusedpref import chunked

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from grad_filter import measure, peaked_head  # noqa: E402

PATHS = {"in-forward": True, "recompute": False}


@pytest.fixture(scope="module")
def head():
    return peaked_head(pairs=3, tokens=24, hidden=32, vocab=1536, steps=40)


@pytest.mark.parametrize("path", PATHS)
def test_the_filtered_gradients_are_those_of_dz_with_the_skipped_blocks_zeroed(path, head):
    """float64, one chunk of pairs and of vocabulary: the fused pass's rows are the valid rows in
    order, so the blocks are the compacted rows' 16-blocks x the 128-column tiles."""
    h0, w0, y, ref = (t.double() if t.is_floating_point() else t for t in head)
    thr = 1e-4
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    loss, _ = fusedpref.preference_loss(h, w, y, ref_logps=ref, beta=0.5, backend="torch",
                                        grad_in_forward=PATHS[path], grad_filter=thr, kept_mb=64)
    dh, dw = torch.autograd.grad(loss, (h, w))

    # the oracle: dz = dL/dz of the eager loss; a row's upstream gradient g = dL/dlogp(y)
    valid = y != -100
    hv = h0[valid]
    z = (hv @ w0.t()).requires_grad_()
    logp = z.log_softmax(-1).gather(1, y[valid][:, None]).squeeze(1)
    seq = torch.zeros(y.shape[0], dtype=z.dtype).index_add(0, valid.nonzero()[:, 0], logp)
    b = y.shape[0] // 2
    margin = (seq[:b] - ref[:b]) - (seq[b:] - ref[b:])
    eager = torch.nn.functional.softplus(-0.5 * margin).mean()
    dz, = torch.autograd.grad(eager, z)
    g = -0.5 * torch.sigmoid(-0.5 * margin) / b
    g_row = torch.cat([g, -g])[valid.nonzero()[:, 0]]
    rel = dz.abs() / g_row.abs()[:, None]
    n, v = rel.shape
    pad = torch.nn.functional.pad(rel, (0, -v % chunked.FILTER_COLS, 0, -n % chunked.FILTER_ROWS))
    blocks = pad.view(pad.shape[0] // chunked.FILTER_ROWS, chunked.FILTER_ROWS, -1, chunked.FILTER_COLS)
    live = blocks.amax((1, 3)) >= thr
    keep = live.repeat_interleave(chunked.FILTER_ROWS, 0).repeat_interleave(chunked.FILTER_COLS, 1)[:n, :v]
    assert 0.05 < keep.double().mean() < 0.95, keep.double().mean()     # some blocks are skipped, not all
    kept_dz = dz * keep
    want_dh = torch.zeros_like(h0)
    want_dh[valid] = kept_dz @ w0
    torch.testing.assert_close(dh, want_dh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dw, kept_dz.t() @ hv, rtol=1e-9, atol=1e-12)


def _grads(kind, filt, gif):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(6, 10, 16, generator=g)
    w = torch.randn(300, 16, generator=g) * 0.3
    bias = torch.randn(300, generator=g) * 0.1
    y = torch.randint(0, 300, (6, 10), generator=g)
    y[:, :3] = -100
    leaves = [t.clone().requires_grad_() for t in (h, w, bias)]
    common = dict(bias=leaves[2], backend="torch", grad_in_forward=gif, grad_filter=filt)
    if kind == "kto":
        loss, _ = fusedpref.kto_loss(leaves[0], leaves[1], y, torch.tensor([True, False] * 3),
                                     ref_logps=torch.randn(6, generator=g), **common)
    elif kind == "expo":
        loss, _ = fusedpref.preference_loss(leaves[0], leaves[1], y, loss_type="expo", ref_hidden=h + 0.1,
                                            ref_weight=w * 0.9, softcap=4.0, **common)
    else:
        loss, _ = fusedpref.preference_loss(leaves[0], leaves[1], y, loss_type=kind, ref_logps=torch.randn(6, generator=g),
                                            **common)
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "expo", "kto"])
def test_a_threshold_below_every_probability_gives_the_exact_gradients(kind, path):
    exact = _grads(kind, None, PATHS[path])
    filtered = _grads(kind, 1e-30, PATHS[path])
    for name, a, b in zip(("dH", "dW", "db"), filtered, exact):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_the_flops_drop_on_a_peaked_head_by_the_same_blocks_on_both_paths(head):
    exact = {p: measure(*head, None, p) for p in ("in forward", "recompute")}
    filt = {p: measure(*head, 1e-4, p) for p in ("in forward", "recompute")}
    saved = exact["recompute"][0] - filt["recompute"][0]
    assert saved > 1.0, (exact, filt)                                # D*V units per valid token
    assert exact["recompute"][0] - exact["in forward"][0] == pytest.approx(2.0)
    assert filt["recompute"][0] - filt["in forward"][0] == pytest.approx(2.0)
    # the same blocks are skipped: the same error on both paths (to the paths' own rounding)
    assert filt["in forward"][1] == pytest.approx(filt["recompute"][1], rel=0.05)


def test_grad_filter_on_the_triton_backend_is_a_clear_error():
    h, w = torch.randn(2, 3, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    with pytest.raises(ValueError, match="grad_filter runs on the torch backend only"):
        fusedpref.preference_loss(h, w, torch.randint(0, 20, (2, 3)), ref_logps=torch.zeros(2), backend="triton",
                                  grad_filter="auto")
