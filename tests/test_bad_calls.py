"""One table of bad calls across the whole public API (primitives, losses, KTO, the module, the
TRL head, the CLI's flags), each with the exception and the words its message must contain."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fusedpref
from helpers import DEVICE

V, D = 50, 16
g = torch.Generator().manual_seed(0)
H = torch.randn(2, 3, D, generator=g).to(DEVICE)             # [2B=2, T=3, D]
W = torch.randn(V, D, generator=g).to(DEVICE)
Y = torch.randint(0, V, (2, 3), generator=g).to(DEVICE)
R = torch.zeros(2, device=DEVICE)
LAB = torch.tensor([True, False], device=DEVICE)
lp, kl, lpkl, pl, kto = (fusedpref.linear_logprobs, fusedpref.linear_kl, fusedpref.linear_logprobs_kl,
                         fusedpref.preference_loss, fusedpref.kto_loss)


CASES = {
    # the primitives
    "targets-shape": (lambda: lp(H, W, Y[:, :2]), ValueError, ["targets", "leading dims"]),
    "weight-D": (lambda: lp(H, torch.randn(V, D + 1, device=DEVICE), Y), ValueError, ["weight has D=17", "hidden"]),
    "weight-1d": (lambda: lp(H, W.flatten(), Y), ValueError, ["weight", "[V, D]"]),
    "weight-empty": (lambda: lp(H, W[:0], Y), ValueError, ["weight", "at least one vocabulary row"]),
    "hidden-D0": (lambda: lp(H[..., :0], W[:, :0], Y), ValueError, ["hidden size D >= 1"]),
    "hidden-scalar": (lambda: lp(torch.tensor(1.0), W, Y), ValueError, ["hidden", "scalar"]),
    "hidden-int": (lambda: lp(H.long(), W.long(), Y), TypeError, ["hidden", "float32"]),
    "hidden-list": (lambda: lp([[1.0]], W, Y), TypeError, ["hidden must be a torch.Tensor"]),
    "logit-scale-zero": (lambda: lp(H, W, Y, logit_scale=0.0), ValueError, ["logit_scale", "finite nonzero"]),
    "logit-scale-str": (lambda: lp(H, W, Y, logit_scale="2"), TypeError, ["logit_scale", "float"]),
    "temperature-zero": (lambda: lp(H, W, Y, temperature=0.0), ValueError, ["temperature", "positive"]),
    # a negative temperature, everywhere one is taken
    "temperature-negative": (lambda: lp(H, W, Y, temperature=-1.0), ValueError, ["temperature", "positive"]),
    "kl-temperature-negative": (lambda: kl(H, W, H, W, Y, temperature=-0.5), ValueError, ["temperature"]),
    "lpkl-temperature-negative": (lambda: lpkl(H, W, H, W, Y, temperature=-2.0), ValueError, ["temperature"]),
    "divergence-temperature-negative": (lambda: fusedpref.linear_divergence(H, W, H, W, Y, temperature=-1.0),
                                        ValueError, ["temperature"]),
    "loss-temperature-negative": (lambda: pl(H, W, Y, ref_logps=R, temperature=-1.0), ValueError,
                                  ["temperature", "positive"]),
    "kto-temperature-negative": (lambda: kto(H, W, Y, LAB, ref_logps=R, temperature=-1.0), ValueError,
                                 ["temperature"]),
    "reference-temperature-negative": (lambda: fusedpref.reference_logps(H, W, Y, temperature=-1.0), ValueError,
                                       ["temperature"]),
    "module-temperature-negative": (lambda: fusedpref.FusedLinearPreferenceLoss(temperature=-1.0), ValueError,
                                    ["temperature"]),
    "loss-ref-softcap": (lambda: pl(H, W, Y, ref_hidden=H, ref_weight=W, ref_softcap=-1.0), ValueError,
                         ["ref_softcap", "positive"]),
    "loss-ref-logit-scale": (lambda: pl(H, W, Y, ref_hidden=H, ref_weight=W, ref_logit_scale=0.0), ValueError,
                             ["ref_logit_scale", "finite nonzero"]),
    "divergence-mix": (lambda: fusedpref.linear_divergence(H, W, H, W, Y, mix=1.5), ValueError,
                       ["mix must lie in [0, 1]", "JSD"]),
    "divergence-mix-str": (lambda: fusedpref.linear_divergence(H, W, H, W, Y, mix="x"), TypeError,
                           ["mix must be a float"]),
    "divergence-beta-alias": (lambda: fusedpref.linear_divergence(H, W, H, W, Y, beta=1.5), ValueError,
                              ["beta must lie in [0, 1]"]),
    "divergence-mix-twice": (lambda: fusedpref.linear_divergence(H, W, H, W, Y, mix=0.5, beta=0.5), TypeError,
                             ["pass the mixture weight once"]),
    "frozen-mode": (lambda: lp(H, W, Y, frozen="fast"), ValueError, ["frozen must be one of"]),
    "loss-frozen-mode": (lambda: pl(H, W, Y, ref_logps=R, frozen=True), ValueError, ["frozen must be one of"]),
    "divergence-ref-scale": (lambda: fusedpref.linear_divergence(H, W, H, W, Y, ref_logit_scale=float("inf")),
                             ValueError, ["ref_logit_scale", "finite nonzero"]),
    "divergence-ref-softcap": (lambda: fusedpref.linear_divergence(H, W, H, W, Y, ref_softcap=-1.0), ValueError,
                               ["ref_softcap", "positive"]),
    "divergence-ref-vocab": (lambda: fusedpref.linear_divergence(H, W, H, W[:-1], Y), ValueError,
                             ["ref_weight has V=49"]),
    "process-group-str": (lambda: lp(H, W, Y, process_group="tp"), TypeError,
                          ["process_group must be a torch.distributed.ProcessGroup", "got str"]),
    "reduce-hidden-grad-int": (lambda: kl(H, W, H, W, Y, reduce_hidden_grad=1), TypeError,
                               ["reduce_hidden_grad must be a bool"]),
    "loss-process-group": (lambda: pl(H, W, Y, ref_logps=R, process_group=3), TypeError, ["process_group", "int"]),
    "kto-process-group": (lambda: kto(H, W, Y, LAB, ref_logps=R, process_group=[0, 1]), TypeError,
                          ["process_group", "list"]),
    "dtype-mismatch": (lambda: lp(H, W.half(), Y), TypeError, ["weight dtype torch.float16", "autocast"]),
    "bias-len": (lambda: lp(H, W, Y, bias=torch.zeros(V - 1, device=DEVICE)), ValueError, ["bias", "[V]=[50]"]),
    "bias-int": (lambda: lp(H, W, Y, bias=torch.zeros(V, dtype=torch.long, device=DEVICE)), TypeError,
                 ["bias", "floating"]),
    "targets-float": (lambda: lp(H, W, Y.float()), TypeError, ["targets", "integer"]),
    "targets-bool": (lambda: lp(H, W, Y > 3), TypeError, ["targets", "integer"]),
    "targets-range": (lambda: lp(H, W, _y_at(0, 0, V)), ValueError,
                      ["[0, V=50)", "ignore_index=-100", "found 50"]),
    "targets-negative": (lambda: lp(H, W, _y_at(1, 2, -3)), ValueError, ["found -3"]),
    "targets-device": (lambda: lp(H, W, Y.to("meta")), ValueError, ["targets is on meta"]),
    "weight-device": (lambda: lp(H, torch.randn(V, D, device="meta"), Y), ValueError, ["weight is on meta"]),
    "ignore-index-float": (lambda: lp(H, W, Y, ignore_index=-100.0), TypeError, ["ignore_index", "integer"]),
    "ignore-index-bool": (lambda: lp(H, W, Y, ignore_index=True), TypeError, ["ignore_index"]),
    "softcap-zero": (lambda: lp(H, W, Y, softcap=0.0), ValueError, ["softcap", "positive"]),
    "softcap-inf": (lambda: lp(H, W, Y, softcap=float("inf")), ValueError, ["softcap", "finite"]),
    "softcap-str": (lambda: lp(H, W, Y, softcap="30"), TypeError, ["softcap"]),
    "backend-name": (lambda: lp(H, W, Y, backend="cuda"), ValueError, ["backend must be one of"]),
    "float64-triton": (lambda: lp(H.double(), W.double(), Y, backend="triton"), TypeError,
                       ["float64", "backend='torch'"]),
    "kl-vocab": (lambda: kl(H, W, H, W[:-1], Y), ValueError, ["ref_weight has V=49", "share the vocabulary"]),
    "kl-rows": (lambda: kl(H, W, H[:1], W, Y), ValueError, ["ref_hidden leading dims"]),
    "kl-ref-dtype": (lambda: kl(H, W, H, W.half(), Y), TypeError, ["ref_weight dtype"]),
    "kl-ref-D": (lambda: lpkl(H, W, H[..., :5], W, Y), ValueError, ["ref_weight has D=16 but ref_hidden has D=5"]),
    "kl-targets": (lambda: kl(H, W, H, W, _y_at(0, 1, 99)), ValueError, ["found 99"]),
    # preference_loss
    "loss-unknown": (lambda: pl(H, W, Y, loss_type="dpo", ref_logps=R), ValueError, ["unknown loss_type 'dpo'"]),
    "loss-empty-list": (lambda: pl(H, W, Y, loss_type=[], ref_logps=R), ValueError, ["at least one loss"]),
    "loss-beta": (lambda: pl(H, W, Y, beta=-1.0, ref_logps=R), ValueError, ["beta must be a positive"]),
    "loss-beta-nan": (lambda: pl(H, W, Y, beta=float("nan"), ref_logps=R), ValueError, ["beta"]),
    "loss-smoothing-range": (lambda: pl(H, W, Y, label_smoothing=0.7, ref_logps=R), ValueError, ["[0, 0.5]"]),
    "loss-smoothing-unused": (lambda: pl(H, W, Y, loss_type="ipo", label_smoothing=0.1, ref_logps=R),
                              ValueError, ["no effect on loss_type ['ipo']"]),
    "loss-exo": (lambda: pl(H, W, Y, loss_type="exo_pair", ref_logps=R), ValueError, ["label_smoothing > 0"]),
    "loss-ld-alpha-range": (lambda: pl(H, W, Y, ld_alpha=1.5, ref_logps=R), ValueError, ["ld_alpha", "[0, 1]"]),
    "loss-ld-alpha-str": (lambda: pl(H, W, Y, ld_alpha="0.5", ref_logps=R), ValueError, ["ld_alpha", "'0.5'"]),
    "loss-ld-alpha-expo": (lambda: pl(H, W, Y, loss_type="expo", ld_alpha=0.5, ref_hidden=H, ref_weight=W),
                           ValueError, ["ld_alpha", "'expo'"]),
    "loss-use-weighting": (lambda: pl(H, W, Y, use_weighting=1, ref_logps=R), TypeError, ["use_weighting", "bool"]),
    "loss-grad-filter-negative": (lambda: pl(H, W, Y, grad_filter=-1e-3, ref_logps=R), ValueError,
                                  ["grad_filter", "positive finite float", "-0.001"]),
    "loss-grad-filter-str": (lambda: pl(H, W, Y, grad_filter="eps", ref_logps=R), ValueError, ["grad_filter", "'auto'"]),
    "loss-grad-filter-bool": (lambda: pl(H, W, Y, grad_filter=True, ref_logps=R), ValueError, ["grad_filter", "True"]),
    "kto-grad-filter-nan": (lambda: kto(H, W, Y, LAB, ref_logps=R, grad_filter=float("nan")), ValueError,
                            ["grad_filter"]),
    "loss-robust": (lambda: pl(H, W, Y, loss_type="robust", label_smoothing=0.5, ref_logps=R), ValueError,
                    ["< 0.5"]),
    "loss-weights-len": (lambda: pl(H, W, Y, loss_type=["sigmoid", "sft"], loss_weights=[1.0], ref_logps=R),
                         ValueError, ["loss_weights has 1 entries"]),
    "loss-weights-str": (lambda: pl(H, W, Y, loss_type=["sigmoid"], loss_weights=["a"], ref_logps=R),
                         TypeError, ["loss_weights entry"]),
    "loss-unknown-param": (lambda: pl(H, W, Y, gamma=1.0, ref_logps=R), TypeError, ["gamma", "accepted"]),
    "loss-gamma": (lambda: pl(H, W, Y, loss_type="simpo", gamma=-5), ValueError, ["gamma must be >= 0"]),
    "loss-alpha": (lambda: pl(H, W, Y, loss_type="cpo", alpha=-1.0), ValueError, ["alpha must be >= 0"]),
    "loss-tau": (lambda: pl(H, W, Y, loss_type="discopop", discopop_tau=0.0, ref_logps=R), ValueError,
                 ["discopop_tau must be > 0"]),
    "loss-reduction": (lambda: pl(H, W, Y, reduction="avg", ref_logps=R), ValueError, ["reduction"]),
    "loss-avg-normalised": (lambda: pl(H, W, Y, loss_type="simpo", average_log_prob=True), ValueError,
                            ["already length-normalises"]),
    "loss-avg-type": (lambda: pl(H, W, Y, average_log_prob=1, ref_logps=R), TypeError, ["average_log_prob"]),
    "loss-no-ref": (lambda: pl(H, W, Y), ValueError, ["needs a reference", "ref_logps [2]"]),
    "loss-both-refs": (lambda: pl(H, W, Y, ref_logps=R, ref_hidden=H, ref_weight=W), ValueError, ["not both"]),
    "loss-ref-half": (lambda: pl(H, W, Y, ref_hidden=H), ValueError, ["given together"]),
    "loss-ref-bias-alone": (lambda: pl(H, W, Y, ref_logps=R, ref_bias=torch.zeros(V, device=DEVICE)), ValueError,
                            ["ref_bias needs ref_hidden"]),
    "loss-ref-logps-shape": (lambda: pl(H, W, Y, ref_logps=R[:1]), ValueError, ["ref_logps", "[2B]=[2]"]),
    "loss-ref-logps-int": (lambda: pl(H, W, Y, ref_logps=R.long()), ValueError, ["ref_logps", "floating"]),
    "loss-2d-hidden": (lambda: pl(H[0], W, Y[0], ref_logps=R), ValueError, ["[2B, T, D]"]),
    "loss-odd-rows": (lambda: pl(H[:1], W, Y[:1], ref_logps=R[:1]), ValueError, ["2B sequences", "1 rows"]),
    "loss-empty-batch": (lambda: pl(H[:0], W, Y[:0], ref_logps=R[:0]), ValueError, ["no sequences"]),
    "loss-expo-vocab": (lambda: pl(H, W, Y, loss_type="expo", ref_logps=R), ValueError, ["expo_kl='vocab'"]),
    "loss-expo-on": (lambda: pl(H, W, Y, loss_type="expo", expo_kl_on="all", ref_hidden=H, ref_weight=W),
                     ValueError, ["expo_kl_on"]),
    "loss-expo-kl": (lambda: pl(H, W, Y, loss_type="expo", expo_kl="exact", ref_hidden=H, ref_weight=W),
                     ValueError, ["expo_kl must be"]),
    "loss-nll-targets-unused": (lambda: pl(H, W, Y, nll_targets=Y[:1], ref_logps=R), ValueError,
                                ["nll_targets is used by"]),
    "loss-nll-targets-shape": (lambda: pl(H, W, Y, loss_type="sft", nll_targets=Y[:, :2]), ValueError,
                               ["nll_targets must have shape [B, T]=[1, 3]"]),
    "loss-ignore-index": (lambda: pl(H, W, Y, ignore_index="x", ref_logps=R), TypeError, ["ignore_index"]),
    # kto_loss
    "kto-labels": (lambda: kto(H, W, Y, LAB.long(), ref_logps=R), ValueError, ["labels must be a bool"]),
    "kto-no-ref": (lambda: kto(H, W, Y, LAB), ValueError, ["needs a reference"]),
    "kto-both-refs": (lambda: kto(H, W, Y, LAB, ref_logps=R, ref_hidden=H, ref_weight=W), ValueError,
                      ["not both"]),
    "kto-ref-logps-shape": (lambda: kto(H, W, Y, LAB, ref_logps=R[:1]), ValueError, ["ref_logps", "[N]=[2]"]),
    "kto-kl-pair": (lambda: kto(H, W, Y, LAB, ref_logps=R, kl_logps=R), ValueError, ["kl_logps and ref_kl_logps"]),
    "kto-kl-both": (lambda: kto(H, W, Y, LAB, ref_hidden=H, ref_weight=W, kl_logps=R, ref_kl_logps=R, kl_hidden=H,
                                ref_kl_hidden=H, kl_targets=Y), ValueError, ["not both"]),
    "kto-kl-partial": (lambda: kto(H, W, Y, LAB, ref_hidden=H, ref_weight=W, kl_hidden=H), ValueError,
                       ["kl_hidden, ref_kl_hidden and kl_targets together"]),
    "kto-kl-needs-head": (lambda: kto(H, W, Y, LAB, ref_logps=R, kl_hidden=H, ref_kl_hidden=H, kl_targets=Y),
                          ValueError, ["runs the reference head"]),
    "kto-beta": (lambda: kto(H, W, Y, LAB, ref_logps=R, beta=0), ValueError, ["beta"]),
    "kto-weight": (lambda: kto(H, W, Y, LAB, ref_logps=R, desirable_weight=-1.0), ValueError,
                   ["desirable_weight must be a finite float >= 0"]),
    "kto-reduction": (lambda: kto(H, W, Y, LAB, ref_logps=R, reduction="x"), ValueError, ["reduction"]),
    "kto-2d": (lambda: kto(H[0], W, Y[0], LAB, ref_logps=R), ValueError, ["[N, T, D]"]),
    # the module: checked at construction
    "module-reduction": (lambda: fusedpref.FusedLinearPreferenceLoss(reduction="bad"), ValueError, ["reduction"]),
    "module-loss": (lambda: fusedpref.FusedLinearPreferenceLoss("nope"), ValueError, ["unknown loss_type"]),
    "module-softcap": (lambda: fusedpref.FusedLinearPreferenceLoss(softcap=-1.0), ValueError, ["softcap"]),
    "module-backend": (lambda: fusedpref.FusedLinearPreferenceLoss(backend="gpu"), ValueError, ["backend"]),
    "module-ignore-index": (lambda: fusedpref.FusedLinearPreferenceLoss(ignore_index=np.float32(1)), TypeError,
                            ["ignore_index"]),
    "module-param": (lambda: fusedpref.FusedLinearPreferenceLoss("sigmoid", tau=1), TypeError, ["tau"]),
    # reference_logps names the reference head
    "reference-D": (lambda: fusedpref.reference_logps(H[..., :5], W, Y), ValueError, ["ref_weight has D=16",
                                                                                      "ref_hidden"]),
    "reference-targets": (lambda: fusedpref.reference_logps(H, W, Y[:, :1]), ValueError, ["targets", "ref_hidden"]),
}


def _y_at(i, j, v):
    y = Y.clone()
    y[i, j] = v
    return y


def test_the_table_is_large():
    assert len(CASES) + len(CLI_CASES) + len(TRL_CASES) >= 40


@pytest.mark.parametrize("case", list(CASES))
def test_bad_call(case):
    call, exc, words = CASES[case]
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), (case, word, str(info.value))


TRL_CASES = {
    "trl-targets": ((torch.randn(5, D), W, None, torch.zeros(4, dtype=torch.long), 1.0, 64, None, 1.0,
                     ("log_probs",)), ValueError, ["targets", "leading dims"]),
    "trl-weight": ((torch.randn(5, D), W[:, :3], None, torch.zeros(5, dtype=torch.long), 1.0, 64, None, 1.0,
                    ("log_probs",)), ValueError, ["weight has D=3"]),
    "trl-softcap": ((torch.randn(5, D), W, None, torch.zeros(5, dtype=torch.long), 1.0, 64, -2.0, 1.0,
                     ("log_probs",)), ValueError, ["softcap"]),
    "trl-logit-scale-zero": ((torch.randn(5, D), W, None, torch.zeros(5, dtype=torch.long), 1.0, 64, 5.0, 0.0,
                              ("log_probs",)), ValueError, ["logit_scale=0"]),
    "trl-temperature": ((torch.randn(5, D), W, None, torch.zeros(5, dtype=torch.long), 0.0, 64, None, 1.0,
                         ("log_probs",)), ValueError, ["temperature", "positive"]),
    "trl-temperature-negative": ((torch.randn(5, D), W, None, torch.zeros(5, dtype=torch.long), -1.0, 64, None, 1.0,
                                  ("log_probs",)), ValueError, ["temperature", "positive"]),
}


@pytest.mark.parametrize("case", list(TRL_CASES))
def test_bad_call_to_the_trl_head(case):
    from helpers import optional

    optional("trl.trainer.utils")
    from fusedpref.integrations.trl import FusedLogProbHead

    args, exc, words = TRL_CASES[case]
    args = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
    with pytest.raises(exc) as info:
        FusedLogProbHead.apply(*args)
    for word in words:
        assert word in str(info.value), (case, word, str(info.value))


CLI_CASES = {
    "cli-loss": (["bench", "--loss-type", "nonsense"], "unknown loss_type 'nonsense'"),
    "cli-exo": (["bench", "--loss-type", "exo_pair"], "needs label_smoothing"),
    "cli-provider": (["bench", "--providers", "eager,nope"], "unknown provider 'nope'"),
    "cli-dtype": (["bench", "--dtype", "float8"], "invalid choice: 'float8'"),
    "cli-int": (["bench", "--pairs", "two"], "invalid int value: 'two'"),
    "cli-command": (["nope"], "unknown command 'nope'"),
    "cli-v-zero": (["bench", "--v", "0"], "--v must be a whole number >= 1, got 0"),
    "cli-d-zero": (["bench", "--d", "0"], "--d must be a whole number >= 1"),
    "cli-seq-negative": (["bench", "--seq", "-1"], "--seq must be a whole number >= 1, got -1"),
    "cli-repeats-zero": (["bench", "--repeats", "0"], "--repeats must be a whole number >= 1"),
    "cli-prompt-frac": (["bench", "--prompt-frac", "1.5"], "--prompt-frac must lie in [0, 1)"),
    "cli-timeout": (["bench", "--timeout", "0"], "--timeout and --budget must be positive"),
    "cli-roofline-zero": (["roofline", "--n", "0"], "--n must be a whole number >= 1, got 0"),
    "cli-roofline-negative": (["roofline", "--v", "-5"], "--v must be a whole number >= 1, got -5"),
    "cli-roofline-chunk": (["roofline", "--chunk-cols", "0"], "--chunk-cols must be a whole number >= 1"),
}


@pytest.mark.slow      # a subprocess per case
@pytest.mark.parametrize("case", list(CLI_CASES))
def test_bad_cli_flag(case):
    args, words = CLI_CASES[case]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    proc = subprocess.run([sys.executable, "-m", "fusedpref.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2 and words in proc.stderr, (case, proc.returncode, proc.stderr[-800:])
