"""What each provider computes (inputs, loss callables, availability) and its error against the
independent float64 oracle (fusedpref.reference)."""
from __future__ import annotations

import torch



ALL_PROVIDERS = ("eager", "compile", "fused-torch", "fused-triton", "torch", "trl", "liger", "cce")
TRL_CHUNK = 32768   # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16
# the CPU default keeps the run under a minute on 2 cores; compile and liger run there too when
# asked for (--providers)
CPU_DEFAULT_PROVIDERS = ("eager", "fused-torch", "torch")
# with --frozen each fused provider also runs as "<provider>:standard" (frozen="standard",
# the 6 N D V frozen path) and "<provider>:trainable" (the head requires grad), side by side; with
# --recompute as "<provider>:recompute" (grad_in_forward=False: the 8 N D V recompute path)
STANDARD, TRAINABLE, RECOMPUTE = "standard", "trainable", "recompute"


def split_variant(provider):
    """("fused-torch", "standard") from "fused-torch:standard"; the variant is "" for the plain name."""
    base, _, variant = provider.partition(":")
    return base, variant


# ----------------------------------------------------------------------------- inputs

def is_expo(loss_type):
    """EXPO/TYPO with its default exact vocabulary KL: needs a reference head, not ref log-probs."""
    from ..losses import LOSSES

    return LOSSES[loss_type].fn is LOSSES["expo"].fn and LOSSES[loss_type].params.get("expo_kl") == "vocab"


def make_inputs(pairs, seq, d, v, dtype, device, prompt_frac=0.5, seed=0, ref_head=False):
    """hidden [2B, T, D], weight [V, D], targets [2B, T] (first prompt_frac of each row ignored)
    and the reference: precomputed log-probs [2B], or with ref_head a reference head
    (ref_hidden [2B, T, D], ref_weight [V, D]) for EXPO's vocabulary KL."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * pairs
    hidden = torch.randn(n, seq, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) * (1.0 / d ** 0.5)).to(dtype)
    targets = torch.randint(0, v, (n, seq), generator=g)
    targets[:, : int(seq * prompt_frac)] = -100
    ref = (-torch.rand(n, generator=g) * seq * 2).to(device)
    if ref_head:
        ref = (torch.randn(n, seq, d, generator=g).to(dtype).to(device),
               (torch.randn(v, d, generator=g) * (1.0 / d ** 0.5)).to(dtype).to(device))
    return hidden.to(device), weight.to(device), targets.to(device), ref


def flop_count(targets, d, v, expo=False, frozen=False):
    """The matmul work of the recompute path per forward+backward, in units of N_valid * D * V (the
    TFLOP/s column's yardstick, the same for every provider): 8 for a trainable head (forward,
    recompute, dW, dH), 6 frozen; EXPO's one pass over two heads: 12, frozen 10."""
    units = (12 if expo else 8) - (2 if frozen else 0)
    return units * int((targets != -100).sum()) * d * v


# ----------------------------------------------------------------------------- providers

def _pair_loss(seq_logps, ref_logps, targets, loss_type, beta, kl=None):
    from ..losses import LOSSES, Pairs

    b = seq_logps.shape[0] // 2
    lengths = (targets != -100).sum(-1).to(seq_logps.dtype).clamp(min=1)
    p = Pairs(seq_logps[:b], seq_logps[b:], ref_logps[:b], ref_logps[b:], lengths[:b], lengths[b:], beta,
              0.0, dict(LOSSES[loss_type].params), None if kl is None else kl[:b], None if kl is None else kl[b:])
    return LOSSES[loss_type].fn(p).mean()


def _eager_loss(hidden, weight, targets, ref, loss_type, beta):
    """Full logits, TRL's way; with a reference head each head's logits are computed once and the
    per-token KL comes from the two full log-softmaxes."""
    from ..reference import eager_logits, eager_logprobs

    if not isinstance(ref, tuple):
        return _pair_loss(eager_logprobs(hidden, weight, targets).sum(-1), ref, targets, loss_type, beta)
    rh, rw = ref
    mask = targets != -100
    safe = torch.where(mask, targets, 0).unsqueeze(-1)
    lp = torch.log_softmax(eager_logits(hidden, weight), -1)
    with torch.no_grad():
        lr = torch.log_softmax(eager_logits(rh, rw), -1)
    logps = (lp.gather(-1, safe).squeeze(-1) * mask).sum(-1)
    ref_logps = (lr.gather(-1, safe).squeeze(-1) * mask).sum(-1)
    kl = ((lr.exp() * (lr - lp)).sum(-1) * mask).sum(-1) if is_expo(loss_type) else None
    return _pair_loss(logps, ref_logps, targets, loss_type, beta, kl)


def available(provider, device):
    provider = split_variant(provider)[0]
    if provider in ("fused-triton", "cce") and device.type != "cuda":
        return False
    if provider == "liger":
        try:
            import liger_kernel.chunked_loss  # noqa: F401
        except Exception:
            return False
    if provider == "cce":
        try:
            import cut_cross_entropy  # noqa: F401
        except Exception:
            return False
    if provider == "torch":
        return hasattr(torch.nn.functional, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
    if provider == "trl":
        try:
            from trl.kernels import ChunkedLogProbFunction  # noqa: F401
        except Exception:
            return False
    return True


def loss_fn(provider, loss_type, beta):
    """A callable (hidden, weight, targets, ref) -> scalar loss; ref as make_inputs returns it."""
    import fusedpref

    provider, variant = split_variant(provider)
    if provider == "eager":
        return lambda h, w, y, r: _eager_loss(h, w, y, r, loss_type, beta)
    if provider == "compile":
        # default dynamic-shape policy: the error check's small shape, then one dynamic recompile
        # serves the sweep's shapes
        compiled = torch.compile(_eager_loss)
        return lambda h, w, y, r: compiled(h, w, y, r, loss_type, beta)
    if provider in ("fused-torch", "fused-triton"):
        backend = provider.split("-")[1]
        frozen = "standard" if variant == STANDARD else "auto"
        gif = False if variant == RECOMPUTE else None

        def fused(h, w, y, r):
            ref = dict(ref_hidden=r[0], ref_weight=r[1]) if isinstance(r, tuple) else dict(ref_logps=r)
            return fusedpref.preference_loss(h, w, y, loss_type=loss_type, beta=beta, backend=backend, frozen=frozen,
                                             grad_in_forward=gif, **ref)[0]
        return fused
    if provider == "torch":
        if is_expo(loss_type):
            raise ValueError("the torch provider gives per-token NLL only: no vocabulary KL for expo")

        def torch_lce(h, w, y, r):
            # PyTorch's own fused head (torch >= 2.13): the chunked path, reduction="none" (its
            # recompute backward), the valid rows only, summed per sequence
            mask = y != -100
            nll = torch.nn.functional.linear_cross_entropy(h[mask], w, y[mask], reduction="none",
                                                           options=torch.nn.LinearCrossEntropyOptions())
            tok = nll.new_zeros(mask.shape).masked_scatter(mask, nll)
            return _pair_loss(-tok.float().sum(-1), r, y, loss_type, beta)
        return torch_lce
    if provider == "trl":
        if is_expo(loss_type):
            raise ValueError("the trl provider gives per-token log-probs only: no vocabulary KL for expo")
        from trl.kernels import ChunkedLogProbFunction

        def trl(h, w, y, r):
            # as trl.trainer.utils.add_fused_lm_head: compacted rows, TRL's vocabulary chunk,
            # DPOTrainer's outputs, scattered back with masked_scatter
            mask = y != -100
            out = ChunkedLogProbFunction.apply(h[mask], w, None, y[mask], 1.0, TRL_CHUNK, None, 1.0,
                                               ("log_probs", "entropy", "mean_logits", "is_top1"))
            tok = out[0].new_zeros(mask.shape).masked_scatter(mask, out[0])
            return _pair_loss(tok.sum(-1), r, y, loss_type, beta)
        return trl
    if provider == "liger":
        if loss_type != "sigmoid":
            raise ValueError("the liger provider is benchmarked with loss_type='sigmoid' only")
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        # Liger takes no precomputed reference log-probs (it runs a reference head or none), so
        # it runs without one: the same work as the others minus the reference subtraction, and
        # its errors are taken against a zero reference (see provider_ref). torch.compile of its
        # chunk step is Liger's default on GPU; on the CPU it would add ~30 s of compilation.
        mod = LigerFusedLinearDPOLoss(beta=beta, use_ref_model=False, compiled=torch.cuda.is_available())

        def liger(h, w, y, r):
            out = mod(w, h, y)
            return out[0] if isinstance(out, tuple) else out
        return liger
    if provider == "cce":
        if is_expo(loss_type):
            raise ValueError("the cce provider gives per-token NLL only: no vocabulary KL for expo")
        from cut_cross_entropy import linear_cross_entropy

        def cce(h, w, y, r):
            nll = linear_cross_entropy(h, w, y, reduction="none", ignore_index=-100)
            return _pair_loss(-nll.float().sum(-1), r, y, loss_type, beta)
        return cce
    raise ValueError(f"unknown provider {provider!r}; choose from {ALL_PROVIDERS}")



def provider_ref(provider, ref_logps):
    """The reference log-probs a provider's loss actually uses (Liger's: none, i.e. zero)."""
    return torch.zeros_like(ref_logps) if provider == "liger" else ref_logps


def errors(provider, dtype, device, loss_type, beta):
    """max |error| of loss, dH, dW against the float64 eager loss at a small shape."""
    from ..reference import eager_preference_loss

    shape = (2, 64, 128, 1000)
    h0, w0, y, r = make_inputs(*shape, dtype, device, seed=1, ref_head=is_expo(loss_type))
    fn = loss_fn(provider, loss_type, beta)
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    loss = fn(h, w, y, r)
    dh, dw = torch.autograd.grad(loss, (h, w))
    ho, wo = h0.double().requires_grad_(), w0.double().requires_grad_()
    # the oracle: fusedpref.reference's own derivation of the loss (shares no code with losses.py)
    if isinstance(r, tuple):
        refs = dict(ref_hidden=r[0].double(), ref_weight=r[1].double())
    else:
        refs = dict(ref_logps=provider_ref(provider, r).double())
    ref, _ = eager_preference_loss(ho, wo, y, loss_type=loss_type, beta=beta, **refs)
    rdh, rdw = torch.autograd.grad(ref, (ho, wo))
    return [abs(loss.item() - ref.item()), (dh.double() - rdh).abs().max().item(),
            (dw.double() - rdw).abs().max().item()]
