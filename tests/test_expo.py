"""EXPO/TYPO: the fused loss against an independent float64 eager reference (full logits and
an exact full-vocabulary KL), for both KL modes and every expo_kl_on; the paper's toy identity."""
import pytest
import torch
import torch.nn.functional as F

import fusedpref
from helpers import DEVICE, assert_within
from fusedpref.losses import LOSSES, Pairs
from fusedpref.reference import eager_logits, eager_preference_loss

B, T, D, V = 3, 8, 20, 89


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * B, T, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.4
    y = torch.randint(0, V, (2 * B, T), generator=g)
    for i in range(2 * B):
        y[i, : 1 + i % 3] = -100
        y[i, T - i % 2:] = -100
    rh = torch.randn(2 * B, T, 12, generator=g)          # reference: other hidden size
    rw = torch.randn(V, 12, generator=g) * 0.5
    return [t.to(DEVICE) for t in (h, w, y, rh, rw)]


def eager_expo(h, w, y, rh, rw, *, beta, expo_kl, expo_kl_on, average_log_prob, softcap=None):
    """Straight from the definition, with full logits."""
    mask = y != -100
    lp = F.log_softmax(eager_logits(h, w, None, softcap), -1)
    lr = F.log_softmax(eager_logits(rh, rw, None, softcap), -1)
    tok = lp.gather(-1, torch.where(mask, y, 0).unsqueeze(-1)).squeeze(-1) * mask
    seq = tok.sum(-1)
    if average_log_prob:
        seq_sup = seq / mask.sum(-1)
    else:
        seq_sup = seq
    sup = F.softplus(-(seq_sup[:B] - seq_sup[B:]))
    if expo_kl == "vocab":
        kl_tok = (lr.exp() * (lr - lp)).sum(-1) * mask
        kl_seq = kl_tok.sum(-1)
    else:
        ref_tok = lr.gather(-1, torch.where(mask, y, 0).unsqueeze(-1)).squeeze(-1) * mask
        kl_seq = ref_tok.sum(-1).detach() - seq
    used = {"both": kl_seq, "chosen": kl_seq[:B], "rejected": kl_seq[B:]}[expo_kl_on]
    return sup.mean() + beta * used.mean()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("expo_kl", ["vocab", "sequence"])
@pytest.mark.parametrize("expo_kl_on", ["both", "chosen", "rejected"])
def test_expo_matches_eager(backend, expo_kl, expo_kl_on):
    h0, w0, y, rh, rw = _data()
    opts = dict(beta=0.3, expo_kl=expo_kl, expo_kl_on=expo_kl_on, average_log_prob=expo_kl_on == "chosen",
                softcap=6.0)
    res, metrics = {}, {}
    for name, dtype in (("fused", torch.float32), ("eager", torch.float32), ("oracle", torch.float64)):
        h, w = (t.detach().to(dtype).requires_grad_() for t in (h0, w0))
        r_h, r_w = rh.to(dtype), rw.to(dtype)
        if name == "fused":
            loss, metrics[name] = fusedpref.preference_loss(h, w, y, loss_type="expo", ref_hidden=r_h,
                                                            ref_weight=r_w, backend=backend, **opts)
        else:
            loss = eager_expo(h, w, y, r_h, r_w, **opts)
            # the shared reference (fusedpref.reference) for the loss and its logged metrics
            ref_loss, metrics[name] = eager_preference_loss(h, w, y, loss_type="expo", ref_hidden=r_h,
                                                            ref_weight=r_w, **opts)
            torch.testing.assert_close(ref_loss, loss, rtol=1e-6, atol=1e-6)
        res[name] = (loss, *torch.autograd.grad(loss, (h, w)))
    for i, name in enumerate(["loss", "dH", "dW"]):
        assert_within(name, res["fused"][i], res["eager"][i], res["oracle"][i], torch.float32)
    assert set(metrics["fused"]) == set(metrics["oracle"])
    for key, o in metrics["oracle"].items():
        assert_within(key, metrics["fused"][key], metrics["eager"][key], o, torch.float32)


def test_sequence_mode_accepts_ref_logps_and_typo_alias():
    h, w, y, rh, rw = _data(1)
    ref = fusedpref.reference_logps(rh, rw, y, backend="torch")
    a, _ = fusedpref.preference_loss(h, w, y, loss_type="expo", expo_kl="sequence", ref_logps=ref, backend="torch")
    b, _ = fusedpref.preference_loss(h, w, y, loss_type="typo", expo_kl="sequence", ref_hidden=rh,
                                     ref_weight=rw, backend="torch")
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="expo_kl='vocab' needs ref_hidden"):
        fusedpref.preference_loss(h, w, y, loss_type="expo", ref_logps=ref, backend="torch")
    with pytest.raises(ValueError, match="expo_kl_on"):
        fusedpref.preference_loss(h, w, y, loss_type="expo", expo_kl_on="all", ref_logps=ref, backend="torch")


@pytest.mark.parametrize("mode", ["vocab", "sequence"])
def test_gradcheck_expo_math(mode):
    g = torch.Generator().manual_seed(2)
    lens = torch.tensor([2.0, 4.0, 3.0], dtype=torch.float64)
    spec = LOSSES["expo"]

    def f(c, r, rc, rr, kc, kr):
        p = Pairs(c, r, rc, rr, lens, lens, 0.4, 0.0, {**spec.params, "expo_kl": mode, "average_log_prob": True},
                  kc, kr)
        return spec.fn(p)

    args = [(-torch.rand(3, generator=g, dtype=torch.float64) * 3 - 0.1).requires_grad_() for _ in range(6)]
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_toy_identity(backend):
    """T=1, D=1, hidden = 1, vocabulary of 3: the weight column is the tabular policy's logits, and
    the fused loss equals softplus(-(lp_w - lp_l)) + lambda * KL(pi_ref || pi) over the 3 outputs."""
    theta = torch.tensor([[0.3], [-0.4], [1.1]], device=DEVICE)        # policy logits
    ref = torch.tensor([[0.0], [0.5], [-0.2]], device=DEVICE)          # reference logits
    hidden = torch.ones(2, 1, 1, device=DEVICE)                         # one pair, T=1, D=1
    y_w, y_l, lam = 2, 1, 0.7
    targets = torch.tensor([[y_w], [y_l]], device=DEVICE)
    loss, _ = fusedpref.preference_loss(hidden, theta, targets, loss_type="expo", beta=lam, ref_hidden=hidden,
                                        ref_weight=ref, backend=backend)
    lp, lr = theta[:, 0].log_softmax(0), ref[:, 0].log_softmax(0)
    official = F.softplus(-(lp[y_w] - lp[y_l])) + lam * (lr.exp() * (lr - lp)).sum()
    assert abs(loss.item() - official.item()) < 1e-6


def test_the_sequence_estimator_is_the_kl_only_for_samples_of_the_reference():
    """expo_kl="sequence" is k1(y) = log pi_ref(y) - log pi_theta(y) of the given responses (README):
    over responses sampled from pi_ref its mean is KL(pi_ref || pi_theta); over responses from
    elsewhere it is no divergence (here negative)."""
    v, pairs = 5, 20000
    g = torch.Generator().manual_seed(0)
    theta, theta_ref = torch.randn(v, 1, generator=g), torch.randn(v, 1, generator=g)
    log_ref = torch.log_softmax(theta_ref[:, 0], 0)
    exact = (log_ref.exp() * (log_ref - torch.log_softmax(theta[:, 0], 0))).sum()
    hidden = torch.ones(2 * pairs, 1, 1)

    def kl_term(y):
        kw = dict(loss_type="expo", expo_kl="sequence", ref_logps=log_ref[y[:, 0]], reduction="none", backend="torch")
        with_kl, _ = fusedpref.preference_loss(hidden, theta, y, beta=1.0, **kw)
        without, _ = fusedpref.preference_loss(hidden, theta, y, beta=0.0, **kw)
        return with_kl - without                            # per pair: (k1(y_w) + k1(y_l)) / 2

    sampled = torch.multinomial(log_ref.exp(), 2 * pairs, replacement=True, generator=g)[:, None]
    est = kl_term(sampled)
    assert abs(est.mean() - exact) < 4 * est.std() / pairs ** 0.5 + 1e-6, (est.mean(), exact)
    best = torch.log_softmax(theta[:, 0], 0).argmax().expand(2 * pairs)[:, None]   # the policy's own favourite
    assert kl_term(best).mean() < 0 < exact
