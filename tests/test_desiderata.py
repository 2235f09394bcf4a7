"""The papers' qualitative claims, on fusedpref's own losses (tabular policy as a linear head)."""
import math

import pytest
import torch

from fusedpref import desiderata as ds


@pytest.fixture(scope="module")
def interp():
    return ds.Problem([ds.INTERP], n_draws=300, seed=0)


@pytest.fixture(scope="module")
def pres():
    return ds.Problem([ds.GOOD, ds.BAD], n_draws=300, seed=1)


def test_bt_mle_is_consistent():
    """The independent Bradley-Terry fit recovers pi* from plenty of data."""
    g = torch.Generator().manual_seed(5)
    w, l = ds.sample_pairs(ds.INTERP["pi_star"], 20000, g)
    assert (ds.bt_mle(w, l) - torch.tensor(ds.INTERP["pi_star"], dtype=torch.float64)).abs().max() < 0.02


@pytest.mark.parametrize("optimizer, tol", [("lbfgs", 2e-3), ("adam", 5e-3)])
def test_expo_small_lambda_reaches_bt_mle(interp, optimizer, tol):
    mle = ds.bt_mle(interp.winners, interp.losers)
    pi = interp.fit("expo", 1e-5, optimizer, 300)[0]
    assert (pi - mle).abs().max() < tol, (pi, mle)
    assert ds.kl(ds.INTERP["pi_star"], pi) < 0.02


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_dpo_ipo_small_lambda_collapse_to_one_hot(interp, loss_type, optimizer):
    pi = interp.fit(loss_type, 1e-5, optimizer, 300)[0]
    assert pi.max() > 0.99, pi                       # far from pi* = [0.6, 0.3, 0.1]
    assert ds.kl(ds.INTERP["pi_star"], pi) > 1.0


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "expo"])
def test_large_lambda_stays_at_reference(interp, loss_type):
    pi = interp.fit(loss_type, 1e2, "lbfgs", 200)[0]
    assert (pi - torch.tensor(ds.INTERP["pi_ref"], dtype=torch.float64)).abs().max() < 0.01, pi


@pytest.mark.parametrize("log_lam", [-5, -2, 0, 3, 5])
def test_expo_preserves_an_optimal_reference(pres, log_lam):
    pi = pres.fit("expo", math.exp(log_lam), "lbfgs", 200)
    assert ds.kl(ds.GOOD["pi_star"], pi[0]) < 0.03


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_ipo_break_an_optimal_reference_at_small_lambda(pres, loss_type):
    pi = pres.fit(loss_type, math.exp(-5), "lbfgs", 200)
    assert ds.kl(ds.GOOD["pi_star"], pi[0]) > 1.0


def test_run_writes_figures(tmp_path):
    rows, _ = ds.run(str(tmp_path), lambdas=[1e-5, 1e2], log_lambdas=[-5, 5], adam_steps=20, lbfgs_steps=20,
                     quiet=True)
    assert len(rows) == 2 * 3 * 2 + 2 * 3 * 2
    for name in ("desiderata_interpolation.png", "desiderata_preservation.png"):
        assert (tmp_path / name).stat().st_size > 10_000


@pytest.mark.slow      # the CLI in a subprocess
def test_the_cli_command_writes_figures(tmp_path):
    """`fusedpref desiderata --out DIR` end to end (few optimizer steps)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fusedpref.cli", "desiderata", "--out", str(tmp_path),
                           "--adam-steps", "3", "--lbfgs-steps", "3"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("desiderata_interpolation.png", "desiderata_preservation.png"):
        assert (tmp_path / name).stat().st_size > 10_000
