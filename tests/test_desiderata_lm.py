"""`fusedpref desiderata --lm` (README "The desiderata on a language model"), reduced: 4 prompts,
two lambdas, 20 DPOTrainer steps per run. Preservation at the smallest lambda (EXPO leaves the good
prompts' reference alone where DPO and IPO move away from it), every run's loss fell, the reference
model is close to pi_ref, and the outputs exist as the command writes them."""
import json

import pytest
from helpers import optional

optional("trl")
optional("datasets")

pytestmark = pytest.mark.slow     # 14 DPOTrainer runs


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from fusedpref.desiderata_lm import run

    out = tmp_path_factory.mktemp("desiderata_lm")
    return run(out, n_prompts=4, lambdas=(0.03, 1.0), steps=20, pairs_per_prompt=32, ref_steps=200, quiet=True), out


def test_preservation_at_the_smallest_lambda(report):
    rows = {(r["loss"], r["lam"]): r for r in report[0]["rows"]}
    expo, dpo, ipo = rows[("expo", 0.03)], rows[("sigmoid", 0.03)], rows[("ipo", 0.03)]
    assert expo["kl_good"] < 0.25 * min(dpo["kl_good"], ipo["kl_good"]), (expo, dpo, ipo)
    # interpolation: EXPO's bad prompts no worse than DPO's at the smallest lambda
    assert expo["kl_bad"] <= dpo["kl_bad"]


def test_every_run_lowered_its_loss_and_the_reference_is_close_to_pi_ref(report):
    rep, out = report
    for r in rep["rows"]:
        assert r["final_loss"] < r["first_loss"], r
        assert 0 <= r["mass_out"] < 1 and r["kl_good"] >= 0 and r["kl_bad"] >= 0
    assert rep["reference"]["kl_ref"] < 0.02 and rep["reference"]["mass_out"] < 0.05, rep["reference"]
    rows = json.loads((out / "lm.json").read_text())
    assert {tuple(sorted(r)) for r in rows} == {tuple(sorted(rep["rows"][0]))}
    assert {"loss", "lam", "kl_good", "kl_bad", "mass_out", "reward_acc", "final_loss"} <= set(rows[0])
    assert (out / "lm.md").read_text().startswith("# desiderata on a language model")
    assert rep["step_s"]["fusedpref"] > 0 and rep["step_s"]["trl"] > 0


def test_the_command_validates_its_flags():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fusedpref.cli", "desiderata", "--lm", "--out", "/tmp/x",
                           "--prompts", "3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--prompts" in proc.stderr, proc.stderr
