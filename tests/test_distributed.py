"""Vocabulary-parallel heads (process_group=) and DTensor heads, on torch.distributed with gloo:
2 and 3 processes on 127.0.0.1, each rank checking its own results.

Rule (the suite's): |vocab-parallel - oracle| <= 2 |single-process fused - oracle| + atol, with the
float64 eager oracle of fusedpref.reference on the full head; shards of V = 37 (not divisible by
2 or 3; with 3 ranks one shard is empty), ignored rows, bias, both backends (Triton in the
interpreter). Gradients: dH on every rank, dW and db gathered from the ranks' shards.
"""
import os

import pytest
import torch
import torch.distributed as dist
from dist_helpers import run_ranks

# gloo ranks in subprocesses; one xdist worker runs every gloo test (scripts/test.sh: --dist loadgroup), so that
# no two pick the same free port at once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("gloo")]

# ------------------------------------------------------------------ helpers (run inside the ranks)

ATOL = 1e-5


def _sizes(world, v):
    if world == 3:
        return [25, 0, v - 25]          # uneven, one rank holding no vocabulary row
    return [v // world + (1 if r < v % world else 0) for r in range(world)]


def _span(sizes, rank):
    lo = sum(sizes[:rank])
    return lo, lo + sizes[rank]


def _gather_rows(t, sizes):
    """The ranks' shards [V_r, ...] concatenated in rank order (padded all_gather)."""
    width = max(sizes)
    pad = t.new_zeros((width, *t.shape[1:]))
    pad[: t.shape[0]] = t
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def _check(name, got, single, oracle):
    got, single, oracle = (t.detach().double() for t in (got, single, oracle))
    assert got.shape == oracle.shape, (name, got.shape, oracle.shape)
    assert torch.isfinite(got).all(), f"{name}: non-finite"
    e = (got - oracle).abs().max().item() if got.numel() else 0.0
    e1 = (single - oracle).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, oracle.abs().max().item()) if got.numel() else 1.0
    assert e <= 2 * e1 + ATOL * scale, f"{name}: vocab-parallel err {e:.3g} > 2 x single-process err {e1:.3g} + atol"


def _problem(v=37, d=16, shape=(4, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, d, generator=g)
    w = torch.randn(v, d, generator=g) / 2
    b = torch.randn(v, generator=g) * 0.3
    rh = h + 0.3 * torch.randn(*shape, d, generator=g)
    rw = w + 0.2 * torch.randn(v, d, generator=g)
    rb = torch.randn(v, generator=g) * 0.3
    y = torch.randint(0, v, shape, generator=g)
    top = (h @ w.t() + b).argmax(-1)
    hit = torch.rand(shape, generator=g) < 0.5
    y[hit] = top[hit]                                       # the argmax statistic is 1 on half the rows
    y[torch.rand(shape, generator=g) < 0.25] = -100
    y[0, 0] = v - 1                                         # the last shard's last id
    return h, w, b, rh, rw, rb, y


def _leaf(t, dtype=None):
    return t.detach().clone().to(dtype or t.dtype).requires_grad_()


def _evaluate(fn, h, w, b, upstream, group=None, sizes=None, frozen=False):
    """fn(h, w, b, group) -> dict of outputs; returns outputs and (dH, gathered dW, gathered db) of
    sum <upstream_k, out_k> (a fixed random weighting of every differentiable output); frozen: the
    head does not require grad, dH only."""
    h = _leaf(h)
    w, b = (w.detach(), b.detach()) if frozen else (_leaf(w), _leaf(b))
    out = fn(h, w, b, group)
    total = sum((o * upstream[k].to(o.dtype)).sum() for k, o in out.items() if o.requires_grad)
    if frozen:
        return {**{k: o.detach() for k, o in out.items()}, "dH": torch.autograd.grad(total, h)[0]}
    dh, dw, db = torch.autograd.grad(total, (h, w, b))
    if group is not None:
        dw, db = _gather_rows(dw, sizes), _gather_rows(db, sizes)
    return {**{k: o.detach() for k, o in out.items()}, "dH": dh, "dW": dw, "db": db}


def _compare(fn, oracle_fn, problem, rank, world, backend, frozen=False):
    h, w, b, rh, rw, rb, y = problem
    sizes = _sizes(world, w.shape[0])
    lo, hi = _span(sizes, rank)
    g = torch.Generator().manual_seed(7)
    probe = fn(h, w, b, rh, rw, rb, y, None, backend)
    upstream = {k: torch.randn(o.shape, generator=g) for k, o in probe.items()}

    def bind(f, be, ref):
        return lambda hh, ww, bb, group: f(hh, ww, bb, *ref, y, group, be)

    shard_ref = (rh, rw[lo:hi], rb[lo:hi])
    got = _evaluate(bind(fn, backend, shard_ref), h, w[lo:hi], b[lo:hi], upstream, dist.group.WORLD, sizes, frozen)
    single = _evaluate(bind(fn, backend, (rh, rw, rb)), h, w, b, upstream, frozen=frozen)
    f64 = tuple(t.double() for t in (rh, rw, rb))
    oracle = _evaluate(bind(oracle_fn, None, f64), h.double(), w.double(), b.double(), upstream, frozen=frozen)
    for k in oracle:
        _check(f"{fn.__name__}{' frozen' if frozen else ''} {backend} rank {rank}: {k}", got[k], single[k], oracle[k])


# the primitives and their float64 oracles: (h, w, b, rh, rw, rb, y, group, backend) -> dict

def logprobs_stats(h, w, b, rh, rw, rb, y, group, backend):
    import fusedpref

    lp, st = fusedpref.LinearLogProbs.apply(h, w, y, b, -100, None, backend, True, None, group)
    return {"logp": lp, "logit_sum": st[..., 0], "entropy": st[..., 1], "hit": st[..., 2].detach(),
            "log_sum_sq": st[..., 3]}


def logprobs_stats_oracle(h, w, b, rh, rw, rb, y, group, backend):
    from fusedpref import reference as R

    st = R.eager_token_stats(h, w, y, b)
    return {"logp": R.eager_logprobs(h, w, y, b), "logit_sum": st[..., 0], "entropy": st[..., 1],
            "hit": st[..., 2].detach(), "log_sum_sq": st[..., 3]}


def logprobs(h, w, b, rh, rw, rb, y, group, backend):
    import fusedpref

    return {"logp": fusedpref.linear_logprobs(h, w, y, bias=b, softcap=6.0, backend=backend, process_group=group)}


def logprobs_oracle(h, w, b, rh, rw, rb, y, group, backend):
    from fusedpref import reference as R

    return {"logp": R.eager_logprobs(h, w, y, b, softcap=6.0)}


def kl(h, w, b, rh, rw, rb, y, group, backend):
    import fusedpref

    return {"kl": fusedpref.linear_kl(h, w, rh, rw, y, bias=b, ref_bias=rb, backend=backend, process_group=group)}


def kl_oracle(h, w, b, rh, rw, rb, y, group, backend):
    from fusedpref import reference as R

    return {"kl": R.eager_kl(h, w, rh, rw, y, b, rb)}


def logprobs_kl(h, w, b, rh, rw, rb, y, group, backend):
    import fusedpref

    lp, rlp, k = fusedpref.linear_logprobs_kl(h, w, rh, rw, y, bias=b, ref_bias=rb, backend=backend,
                                              process_group=group)
    return {"logp": lp, "ref_logp": rlp, "kl": k}


def logprobs_kl_oracle(h, w, b, rh, rw, rb, y, group, backend):
    from fusedpref import reference as R

    return {"logp": R.eager_logprobs(h, w, y, b), "ref_logp": R.eager_logprobs(rh, rw, y, rb).detach(),
            "kl": R.eager_kl(h, w, rh, rw, y, b, rb)}


def divergences(h, w, b, rh, rw, rb, y, group, backend):
    import fusedpref

    kw = dict(bias=b, ref_bias=rb, backend=backend, process_group=group, softcap=4.0, ref_softcap=5.0)
    return {f"beta{beta}": fusedpref.linear_divergence(h, w, rh, rw, y, mix=beta, **kw) for beta in (0.5, 1.0)}


def divergences_oracle(h, w, b, rh, rw, rb, y, group, backend):
    from fusedpref import reference as R

    kw = dict(bias=b, ref_bias=rb, softcap=4.0, ref_softcap=5.0)
    return {f"beta{beta}": R.eager_divergence(h, w, rh, rw, y, beta=beta, **kw) for beta in (0.5, 1.0)}


PRIMITIVES = [(logprobs_stats, logprobs_stats_oracle), (kl, kl_oracle), (logprobs_kl, logprobs_kl_oracle),
              (divergences, divergences_oracle)]


def _pair_losses():
    """(name, kwargs) of the preference losses checked, with a reference head where they take one."""
    return [("sigmoid", dict(loss_type="sigmoid")), ("ipo", dict(loss_type="ipo")),
            ("simpo", dict(loss_type="simpo", beta=2.0)), ("expo", dict(loss_type="expo", beta=0.5))]


def _loss_fn(name, kwargs, paired=True):
    """A preference_loss / kto_loss case in the dict form of the primitives (loss + metrics)."""
    def run(h, w, b, rh, rw, rb, y, group, backend, oracle=False):
        import fusedpref
        from fusedpref import reference as R

        ref = {} if kwargs["loss_type"] == "simpo" else dict(ref_hidden=rh, ref_weight=rw, ref_bias=rb)
        if oracle:
            if not paired:
                loss, metrics = R.eager_kto_loss(h, w, y, _labels(), beta=0.1, ref_hidden=rh, ref_weight=rw, bias=b)
            else:
                loss, metrics = R.eager_preference_loss(h, w, y, bias=b, **{**dict(beta=0.1), **kwargs}, **ref)
        elif not paired:
            loss, metrics = fusedpref.kto_loss(h, w, y, _labels(), beta=0.1, bias=b, ref_hidden=rh, ref_weight=rw,
                                               backend=backend, process_group=group)
        else:
            loss, metrics = fusedpref.preference_loss(h, w, y, bias=b, backend=backend, process_group=group,
                                                      **{**dict(beta=0.1), **kwargs}, **ref)
        return {"loss": loss, **{k: v.detach() for k, v in metrics.items()}}

    run.__name__ = name
    return run


def _labels():
    return torch.tensor([True, False, True, True])


def _pair_oracle(name, kwargs, paired=True):
    f = _loss_fn(name, kwargs, paired)

    def oracle(*args):
        return f(*args[:5], None, *args[6:], oracle=True)     # the reference bias is 0 in these cases
    return oracle


def _ranks_primitives(rank, world, backend):
    os.environ["FUSEDPREF_CHUNK_COLS"] = "8"        # several chunks per shard
    problem = _problem()
    for fn, oracle in PRIMITIVES:
        _compare(fn, oracle, problem, rank, world, backend)
    # a frozen head (LoRA) under a process group: the one-pass path, each shard's part of the
    # direction summed by the dH all_reduce
    import fusedpref.chunked
    import fusedpref.ops

    taken = []
    for mod in (fusedpref.chunked, fusedpref.ops):
        for name in ("logprob_partials_frozen", "kl_partials_frozen"):
            original = getattr(mod, name)
            setattr(mod, name, lambda *a, _f=original, _n=name, **k: taken.append(_n) or _f(*a, **k))
    for fn, oracle in ((logprobs, logprobs_oracle), (kl, kl_oracle), (logprobs_kl, logprobs_kl_oracle)):
        before = len(taken)
        _compare(fn, oracle, problem, rank, world, backend, frozen=True)
        assert len(taken) > before or _span(_sizes(world, 37), rank)[0] == _span(_sizes(world, 37), rank)[1], \
            f"{fn.__name__}: the one-pass frozen path was not taken"


def _ranks_losses(rank, world, backend):
    h, w, b, rh, rw, rb, y = _problem()
    losses = [(_loss_fn(n, kw), _pair_oracle(n, kw)) for n, kw in _pair_losses()]
    losses.append((_loss_fn("kto", dict(loss_type="kto"), paired=False),
                   _pair_oracle("kto", dict(loss_type="kto"), paired=False)))
    for fn, oracle in losses:
        # the oracles' reference heads carry no bias: give the fused ones none either
        _compare(fn, oracle, (h, w, b, rh, rw, torch.zeros_like(rb), y), rank, world, backend)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vocab_parallel_primitives_equal_the_single_process_head(world, backend):
    run_ranks(_ranks_primitives, world, backend)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vocab_parallel_losses_equal_the_single_process_loss(world, backend):
    run_ranks(_ranks_losses, world, backend)


def _ranks_edges(rank, world, backend):
    """Edge cases of the merge: a row whose every logit is negative beside an empty shard (the argmax
    and the hit statistic must come from a shard that holds columns), and a frozen head with
    reduce_hidden_grad=False (each rank's dH is its shard's share; the shares sum to the reduced dH)."""
    import fusedpref

    os.environ["FUSEDPREF_CHUNK_COLS"] = "8"
    h, w, b, rh, rw, rb, y = _problem()
    b = b - 50.0                                            # every logit < 0
    top = (h @ w.t() + b).argmax(-1)
    y = torch.where(y == -100, y, top)                      # every valid target is the argmax: hit = 1
    _compare(logprobs_stats, logprobs_stats_oracle, (h, w, b, rh, rw, rb, y), rank, world, backend)
    sizes = _sizes(world, 37)
    lo, hi = _span(sizes, rank)
    for fn in (lambda hh, ww, rs: fusedpref.linear_logprobs(hh, ww, y, backend=backend, process_group=dist.group.WORLD,
                                                            reduce_hidden_grad=rs),
               lambda hh, ww, rs: fusedpref.linear_logprobs_kl(hh, ww, rh, rw[lo:hi], y, backend=backend,
                                                               process_group=dist.group.WORLD,
                                                               reduce_hidden_grad=rs)[2]):
        grads = []
        for reduce in (True, False):
            hh = _leaf(h)
            out = fn(hh, w[lo:hi].detach(), reduce)            # a frozen head: the one-pass path
            grads.append(torch.autograd.grad((out * torch.arange(out.numel()).view(out.shape)).sum(), hh)[0])
        part = grads[1].clone()
        dist.all_reduce(part)
        torch.testing.assert_close(part, grads[0], rtol=1e-5, atol=1e-6)
        assert world == 1 or not torch.allclose(grads[1], grads[0]), "reduce_hidden_grad=False reduced anyway"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vocab_parallel_edges_empty_shard_negative_logits_and_unreduced_frozen_dh(backend):
    run_ranks(_ranks_edges, 3, backend)


def _ranks_disagree(rank, world, case):
    """Ranks that disagree raise the same clear error on every rank (no crash, no hang), and the group
    still works afterwards."""
    import fusedpref

    h, w, b, rh, rw, rb, y = _problem()
    lo, hi = _span(_sizes(world, 37), rank)
    group = dist.group.WORLD

    def lp(hh, ww):
        return fusedpref.linear_logprobs(hh, ww, y, backend="torch", process_group=group)

    if case == "dtype":
        dt = torch.float64 if rank == 1 else torch.float32
        call, words = (lambda: lp(h.to(dt), w[lo:hi].to(dt))), "different dtypes"
    elif case == "call":
        call = (lambda: lp(h, w[lo:hi])) if rank == 0 else \
            (lambda: fusedpref.linear_kl(h, w[lo:hi], rh, rw[lo:hi], y, backend="torch", process_group=group))
        words = "different fused head calls"
    else:
        call, words = (lambda: lp(h, w)), "holds the same weight rows"
    with pytest.raises(ValueError, match=words):
        call()
    got = lp(h, w[lo:hi])                                     # the group is still usable
    torch.testing.assert_close(got, fusedpref.linear_logprobs(h, w, y, backend="torch"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["dtype", "call", "full-head"])
def test_ranks_that_disagree_raise_on_every_rank(case):
    run_ranks(_ranks_disagree, 2, case)


# ------------------------------------------------------------------ what crosses ranks, what is allocated

_COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast",
                "reduce_scatter_tensor", "reduce_scatter", "all_to_all", "all_to_all_single", "reduce", "gather",
                "scatter", "send", "isend", "all_gather_object", "broadcast_object_list")


class _Traffic:
    """Records (collective, payload bytes this rank sends) for every torch.distributed collective."""

    def __init__(self):
        self.calls, self._orig = [], {}

    def __enter__(self):
        for name in _COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._orig[name] = fn

            def wrapped(*args, _fn=fn, _name=name, **kwargs):
                sent = args[1] if _name in ("all_gather_single", "all_gather_into_tensor") else args[0]
                size = sent.numel() * sent.element_size() if isinstance(sent, torch.Tensor) else -1
                self.calls.append((_name, size))
                return _fn(*args, **kwargs)
            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, fn in self._orig.items():
            setattr(dist, name, fn)

    @property
    def bytes(self):
        return sum(size for _, size in self.calls)


class _Largest(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest tensor (bytes) any aten op produces while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.nbytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.nbytes:
                self.nbytes, self.op = t.numel() * t.element_size(), func
        return out


def _step(h, w, b, rh, rw, rb, y, backend, loss_type, reduce_hidden_grad=True):
    import fusedpref

    h, w, b = _leaf(h), _leaf(w), _leaf(b)
    loss, _ = fusedpref.preference_loss(h, w, y, bias=b, ref_hidden=rh, ref_weight=rw, ref_bias=rb,
                                        loss_type=loss_type, backend=backend, process_group=dist.group.WORLD,
                                        reduce_hidden_grad=reduce_hidden_grad)
    loss.backward()
    return h.grad


def _ranks_traffic(rank, world, backend):
    os.environ["FUSEDPREF_CHUNK_COLS"] = "8"
    d = 16
    for loss_type, planes in (("expo", 12 + 0), ("sigmoid", 8 + 3)):
        sent = {}
        y = _problem(v=37, d=d)[-1]          # the same targets (so the same valid rows) for both V
        for v in (37, 301):
            h, w, b, rh, rw, rb, _ = _problem(v=v, d=d)
            sizes = _sizes(world, v)
            lo, hi = _span(sizes, rank)
            # each rank holds only its shards (copies: a view would keep the whole head's storage alive)
            shard = tuple(t.clone() for t in (w[lo:hi], b[lo:hi], rh, rw[lo:hi], rb[lo:hi]))
            with _Traffic() as traffic, _Largest() as largest:
                _step(h, shard[0], shard[1], *shard[2:], y, backend, loss_type)
            sent[v] = traffic.calls
            nv = int((y != -100).sum())
            calls = 1 if loss_type == "expo" else 2       # EXPO: one two-head pass; sigmoid: policy + reference
            # per call 8 int64 (layout and consistency), then the partial planes in fp32 (EXPO: 11 planes +
            # the argmax id; sigmoid: 7 + id for the policy, 3 for the reference), and backward the fp32
            # all_reduce of dH over the valid rows (the metrics' global V comes with the layout)
            expected = calls * 64 + 4 * planes * nv + 4 * nv * d
            assert traffic.bytes == expected, (loss_type, v, traffic.calls, expected)
            n_rows = y.numel()
            # (at V = 37 the gathered planes [world x 12, Nv] are as large as a shard's logits would be)
            bound = 4 * n_rows * max(hi - lo, v // world)  # fp32 N x (the shard, or an even shard if smaller)
            assert v == 37 or largest.nbytes < bound, \
                f"{loss_type} V={v}: an op produced {largest.nbytes} bytes ({largest.op}) >= {bound}"
            assert largest.nbytes >= 4 * (hi - lo) * d or hi == lo, "the backward's dW was not observed"
        assert sent[37] == sent[301], f"bytes sent depend on V: {sent}"
    # reduce_hidden_grad=False: each rank's dH is its shard's part; their sum is the reduced one
    h, w, b, rh, rw, rb, y = _problem()
    lo, hi = _span(_sizes(world, 37), rank)
    args = (h, w[lo:hi], b[lo:hi], rh, rw[lo:hi], rb[lo:hi], y, backend, "sigmoid")
    full = _step(*args)
    with _Traffic() as traffic:
        part = _step(*args, reduce_hidden_grad=False)
    assert all(name != "all_reduce" for name, size in traffic.calls), traffic.calls
    dist.all_reduce(part)
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vocab_parallel_sends_O_N_bytes_and_allocates_no_N_by_V_tensor(world, backend):
    run_ranks(_ranks_traffic, world, backend)


def _ranks_compiled(rank, world, loss_type):
    """A step over the vocabulary-parallel heads under torch.compile(fullgraph=True) (the collectives
    run inside the custom ops) gives eager's loss, metrics and gradients."""
    import fusedpref

    torch.manual_seed(0)
    h, w, b, rh, rw, rb, y = _problem()
    lo, hi = _span(_sizes(world, 37), rank)
    shard = (w[lo:hi], b[lo:hi], rw[lo:hi], rb[lo:hi])

    def step(h, w, b, rw, rb):
        loss, metrics = fusedpref.preference_loss(h, w, y, bias=b, ref_hidden=rh, ref_weight=rw, ref_bias=rb,
                                                  loss_type=loss_type, beta=0.5, backend="torch",
                                                  process_group=dist.group.WORLD)
        return loss, metrics["rewards/margins"], metrics["logits/chosen"], metrics["entropy"]

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        leaves = [_leaf(h), _leaf(shard[0]), _leaf(shard[1]), shard[2], shard[3]]
        out = fn(*leaves)
        out[0].backward()
        results.append((out, leaves[0].grad, leaves[1].grad, leaves[2].grad))
    (eager, *eager_grads), (compiled, *compiled_grads) = results
    for a, c in zip(eager, compiled):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)
    for a, c in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "expo"])
def test_vocab_parallel_step_compiles_fullgraph(loss_type):
    run_ranks(_ranks_compiled, 2, loss_type)


# ------------------------------------------------------------------ DTensor heads: tensor parallel, FSDP2

class Tiny(torch.nn.Module):
    """Embedding -> tanh(linear) -> hidden states; the LM head (weight [V, D], bias [V]) kept apart,
    as a trainer's fused-head path uses it."""

    def __init__(self, v=37, d=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(v, d)
        self.proj = torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, v)

    def forward(self, ids):
        return torch.tanh(self.proj(self.emb(ids)))


def _batch(v=37, pairs=4, t=7, seed=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, v, (2 * pairs, t), generator=g)
    targets = torch.roll(ids, -1, dims=1)
    targets[:, :2] = -100                     # the prompt
    targets[:, -1] = -100
    return ids, targets


def _shard_head(model, mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    for name in ("weight", "bias"):
        p = getattr(model.head, name)
        setattr(model.head, name, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)]),
                                                     requires_grad=p.requires_grad))
    return model


def _ranks_tensor_parallel(rank, world):
    """A tiny model whose head (and its reference's) is a Shard(0) DTensor on a 2-rank mesh, 5 SGD
    steps: explicit process_group with sigmoid, and the group taken from a Replicate() hidden
    DTensor with EXPO (exact vocabulary KL): the losses and the final head of the unsharded model."""
    import fusedpref
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    ids, targets = _batch()
    for loss_type, how in (("sigmoid", "process_group"), ("expo", "replicated hidden")):
        runs = {}
        for kind in ("plain", "tp"):
            model, ref = Tiny(), Tiny(seed=1).requires_grad_(False)
            if kind == "tp":
                model, ref = _shard_head(model, mesh), _shard_head(ref, mesh)
                assert isinstance(model.head.weight, DTensor) and model.head.weight.to_local().shape[0] == 19 - rank
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            losses = []
            for _ in range(5):
                h, rh = model(ids), ref(ids)
                group = None
                if kind == "tp" and how == "process_group":
                    group = mesh.get_group()
                elif kind == "tp":
                    h = DTensor.from_local(h, mesh, [Replicate()])
                loss, metrics = fusedpref.preference_loss(
                    h, model.head.weight, targets, bias=model.head.bias, ref_hidden=rh, ref_weight=ref.head.weight,
                    ref_bias=ref.head.bias, loss_type=loss_type, beta=0.5, backend="torch", process_group=group)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(torch.stack([loss.detach(), metrics["rewards/margins"], metrics["entropy"]]))
            w = model.head.weight
            runs[kind] = (torch.stack(losses), (w.full_tensor() if isinstance(w, DTensor) else w).detach(),
                          model.proj.weight.detach().clone())
        for name, a, b in zip(("losses/margins/entropy", "head weight", "body weight"), runs["tp"], runs["plain"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{loss_type} ({how}) rank {rank}: {name}")
        assert (runs["plain"][0][0, 0] - runs["plain"][0][-1, 0]) > 1e-3, "the loss did not move in 5 steps"
    # placements fusedpref cannot use raise clearly
    w = distribute_tensor(torch.randn(37, 16), mesh, [Shard(1)])
    with pytest.raises(ValueError, match=r"placements \[Shard\(dim=1\)\].*supported: Shard\(0\)"):
        fusedpref.linear_logprobs(torch.randn(3, 16), w, torch.zeros(3, dtype=torch.long))
    # ranks that do not share the targets (data parallel) cannot be vocabulary-parallel
    y = torch.full((3,), rank, dtype=torch.long)
    with pytest.raises(ValueError, match=r"the targets \(checksums\) differ across ranks"):
        fusedpref.linear_logprobs(torch.randn(3, 16), torch.randn(5, 16), y, process_group=dist.group.WORLD)


def _ranks_fsdp2(rank, world):
    """FSDP2: a tiny model under fully_shard (its head a sharded DTensor after forward when resharded,
    else the unsharded parameter), each rank its own pairs; 5 SGD steps: the ranks' mean loss and the
    final weights equal the unsharded model trained on the whole batch."""
    import fusedpref
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    ids, targets = _batch(pairs=2 * world)
    b = ids.shape[0] // 2
    mine = torch.cat([torch.arange(2 * rank, 2 * rank + 2), b + torch.arange(2 * rank, 2 * rank + 2)])
    ref_logps = -20.0 + torch.randn(2 * b, generator=torch.Generator().manual_seed(2))
    for reshard in (True, False):
        runs = {}
        for kind in ("plain", "fsdp2"):
            model = Tiny()
            if kind == "fsdp2":
                fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            rows = mine if kind == "fsdp2" else torch.arange(2 * b)
            losses, head_kinds = [], set()
            for _ in range(5):
                h = model(ids[rows])
                head_kinds.add(type(model.head.weight).__name__)
                loss, _ = fusedpref.preference_loss(h, model.head.weight, targets[rows], bias=model.head.bias,
                                                    ref_logps=ref_logps[rows], loss_type="sigmoid", beta=0.5,
                                                    backend="torch")
                opt.zero_grad()
                loss.backward()
                opt.step()
                mean = loss.detach().clone()
                if kind == "fsdp2":
                    dist.all_reduce(mean)
                    mean /= world
                losses.append(mean)
            full = [p.full_tensor() if isinstance(p, DTensor) else p for p in (model.head.weight, model.proj.weight)]
            runs[kind] = (torch.stack(losses), *(p.detach().clone() for p in full))
            if kind == "fsdp2":
                assert head_kinds == ({"DTensor"} if reshard else {"Parameter"}), head_kinds
        for name, a, c in zip(("mean loss", "head weight", "body weight"), runs["fsdp2"], runs["plain"]):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6, msg=f"reshard={reshard} rank {rank}: {name}")


def test_tensor_parallel_dtensor_head_trains_as_the_unsharded_model():
    run_ranks(_ranks_tensor_parallel, 2)


def test_fsdp2_head_gathered_once_trains_as_the_unsharded_model():
    run_ranks(_ranks_fsdp2, 2)
