"""`fusedpref bench` runs end to end (tiny shape), prints the table, writes CSV and PNG."""
import csv
import functools
import os
import subprocess
import sys

import pytest
from helpers import optional

pytestmark = pytest.mark.slow   # the bench CLI in subprocesses


def test_bench_command_writes_table_csv_png(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    cmd = [sys.executable, "-m", "fusedpref.cli", "bench", "--pairs", "2", "--seq", "64", "--d", "32",
           "--v", "32000", "--repeats", "1", "--providers", "eager,fused-torch", "--dtype", "float32", "--out", str(tmp_path),
           "--tag", "test"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| eager |" in out and "| fused-torch |" in out
    rows = list(csv.DictReader(open(tmp_path / "bench-test.csv")))
    table = {r["provider"]: r for r in rows if r["sweep"] == "table"}
    assert set(table) == {"eager", "fused-torch"}
    for r in table.values():
        assert float(r["fwd_bwd_ms"]) > 0 and float(r["err_loss"]) < 1e-5 and float(r["err_dw"]) < 1e-5
        assert r["commit"] and r["device"] and r["torch"] and int(r["n_valid"]) == 128
    assert float(table["eager"]["peak_mb"]) > float(table["fused-torch"]["peak_mb"])
    assert (tmp_path / "bench-test.png").stat().st_size > 10_000


def test_cli_usage_and_unknown_command():
    proc = subprocess.run([sys.executable, "-m", "fusedpref.cli"], capture_output=True, text=True)
    assert proc.returncode == 0 and "bench" in proc.stdout and "desiderata" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "fusedpref.cli", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown command" in proc.stderr


def _bench(tmp_path, *args, timeout=300, status=0):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    cmd = [sys.executable, "-m", "fusedpref.cli", "bench", "--pairs", "1", "--seq", "32", "--d", "32",
           "--v", "1000", "--repeats", "1", "--no-sweep", "--dtype", "float32", "--out", str(tmp_path), "--tag", "t", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == status, (proc.returncode, proc.stderr[-3000:])
    return {r["provider"]: r for r in csv.DictReader(open(tmp_path / "bench-t.csv"))}, proc.stdout


def test_liger_provider_matches_the_float64_reference(tmp_path):
    optional("liger_kernel.chunked_loss")
    rows, out = _bench(tmp_path, "--providers", "eager,liger")
    assert rows["liger"]["status"] == "ok", rows["liger"]["status"]
    # Liger runs without reference log-probs; its errors are taken against a zero reference
    for k in ("err_loss", "err_dh", "err_dw"):
        assert float(rows["liger"][k]) < 1e-5
    assert float(rows["liger"]["fwd_bwd_ms"]) > 0


def test_a_failing_provider_is_reported_and_the_others_run(tmp_path):
    optional("liger_kernel.chunked_loss")
    rows, out = _bench(tmp_path, "--providers", "eager,liger", "--loss-type", "ipo", status=1)
    assert rows["eager"]["status"] == "ok"
    assert rows["liger"]["status"].startswith("error: ValueError") and "sigmoid" in rows["liger"]["status"]
    assert "| liger |" in out and "# failed: liger" in out
    rows, out = _bench(tmp_path, "--providers", "eager,liger", "--loss-type", "ipo", "--keep-going", status=0)
    assert rows["liger"]["status"].startswith("error: ValueError")


def test_a_provider_past_its_timeout_is_stopped(tmp_path):
    rows, out = _bench(tmp_path, "--providers", "eager", "--timeout", "0.5", status=1)
    assert rows["eager"]["status"] == "timeout"


def test_a_spent_budget_skips_the_remaining_providers(tmp_path):
    rows, out = _bench(tmp_path, "--providers", "eager,fused-torch", "--budget", "3", status=1)
    assert all(r["status"] in ("timeout", "skipped: --budget spent") for r in rows.values()), rows
    assert "| fused-torch |" in out


def test_cce_adapter_sums_per_sequence(monkeypatch):
    """The cce provider's adapter (reduction="none", summed per sequence) against the float64
    reference, through CCE's torch implementation (its Triton kernels need CUDA)."""
    cce = optional("cut_cross_entropy")
    import torch
    from fusedpref import bench

    monkeypatch.setattr(cce, "linear_cross_entropy", functools.partial(cce.linear_cross_entropy, impl="torch_compile"))
    errs = bench.errors("cce", torch.float32, torch.device("cpu"), "sigmoid", 0.1)
    assert max(errs) < 1e-5, errs


def test_expo_is_benchmarked_with_a_reference_head(tmp_path):
    rows, out = _bench(tmp_path, "--providers", "eager,fused-torch", "--loss-type", "expo")
    assert "loss expo" in out and "12*N_valid*D*V" in out
    for r in rows.values():
        assert r["status"] == "ok", r["status"]
        assert float(r["err_loss"]) < 1e-4 and float(r["err_dw"]) < 1e-4 and float(r["err_dh"]) < 1e-5
        assert float(r["flops"]) == 12 * int(r["n_valid"]) * 32 * 1000


def test_bad_loss_configuration_is_a_usage_error():
    for args, msg in ((["--loss-type", "nonsense"], "unknown loss_type 'nonsense'"),
                      (["--loss-type", "exo_pair"], "needs label_smoothing"),
                      (["--providers", "eager,nope"], "unknown provider 'nope'")):
        proc = subprocess.run([sys.executable, "-m", "fusedpref.cli", "bench", *args], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and msg in proc.stderr, (args, proc.stderr[-500:])


def test_compile_provider_traces_the_eager_loss():
    """torch.compile of the eager loss (the GPU's `compile` provider) compiles and agrees with the
    float64 reference; here on the CPU's inductor backend."""
    import torch
    from fusedpref import bench

    errs = bench.errors("compile", torch.float32, torch.device("cpu"), "sigmoid", 0.1)
    assert max(errs) < 1e-5, errs


def test_trl_provider_matches_the_float64_reference():
    """TRL's own chunked LM head, called as DPOTrainer calls it (torch ops on the CPU)."""
    optional("trl.kernels")
    import torch
    from fusedpref import bench

    assert bench.available("trl", torch.device("cpu"))
    for loss_type in ("sigmoid", "ipo"):   # ipo: real sequence lengths in every provider's loss
        errs = bench.errors("trl", torch.float32, torch.device("cpu"), loss_type, 0.1)
        assert max(errs) < 1e-4 and errs[2] < 1e-5, (loss_type, errs)
    with pytest.raises(ValueError, match="no vocabulary KL"):
        bench.loss_fn("trl", "expo", 0.1)


def test_comparators_are_installed_where_required():
    """scripts/test.sh (and so CI) installs every comparator and sets FUSEDPREF_REQUIRE_ALL=1: then
    each must import, and the bench must report it available."""
    import os

    if os.environ.get("FUSEDPREF_REQUIRE_ALL") != "1":
        pytest.skip("comparators are optional outside scripts/test.sh")
    import torch
    from fusedpref import bench

    for module in ("liger_kernel.chunked_loss", "cut_cross_entropy", "trl.kernels", "transformers", "datasets"):
        optional(module)
    assert bench.available("trl", torch.device("cpu")) and bench.available("liger", torch.device("cpu"))


def test_frozen_dtype_prompt_frac_and_beta_flags(tmp_path):
    rows, out = _bench(tmp_path, "--providers", "eager,fused-torch", "--frozen", "--dtype", "bfloat16",
                       "--prompt-frac", "0.25", "--beta", "0.3")
    # the fused provider's one-pass frozen path beside its standard frozen path and a trainable head
    assert set(rows) == {"eager", "fused-torch", "fused-torch:standard", "fused-torch:trainable"}, set(rows)
    for name, r in rows.items():
        trainable = name.endswith(":trainable")
        assert r["status"] == "ok", r["status"]
        assert r["frozen"] == str(not trainable) and r["dtype"] == "bfloat16", r
        assert int(r["n_valid"]) == 2 * (32 - 8)                  # 1 pair x 2 x (32 - 25% prompt)
        assert float(r["flops"]) == (8 if trainable else 6) * int(r["n_valid"]) * 32 * 1000   # frozen: no dW
        assert float(r["err_loss"]) < 5e-2 and float(r["err_dh"]) < 5e-2   # bf16
    assert "(beta 0.3)" in out and all(r["beta"] == "0.3" for r in rows.values()), out[:800]
    assert "# frozen head, fused-torch: one-pass / standard frozen path time" in out, out[-800:]


def test_default_output_is_a_fresh_folder_and_plotting_is_optional(tmp_path):
    """Without --out the bench writes into a new out/bench-<time> folder (never the committed
    bench/results/); without matplotlib and tqdm (the `fusedpref[bench]` extra) it still prints the
    table and writes the CSV, and says how to get the plot."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('matplotlib', 'tqdm'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (simulated)')\n"
        "sys.meta_path.insert(0, _Hide())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env["PYTHONPATH"] = os.pathsep.join([str(shadow), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "fusedpref.cli", "bench", "--pairs", "1", "--seq", "32", "--d", "32", "--v", "500",
           "--repeats", "1", "--providers", "fused-torch", "--dtype", "float32", "--tag", "t"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| fused-torch |" in proc.stdout and "pip install 'fusedpref[bench]'" in proc.stdout
    written = list((tmp_path / "out").glob("bench-*/bench-t.csv"))
    assert len(written) == 1 and not (tmp_path / "bench").exists()


def test_version_and_python_m():
    from fusedpref import __version__

    for cmd in ([sys.executable, "-m", "fusedpref", "--version"], [sys.executable, "-m", "fusedpref.cli", "--version"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stdout.strip() == f"fusedpref {__version__}"


def test_the_whole_step_benchmark_runs_every_head():
    """bench/trl_step.py at a tiny shape: one row per head, the same first loss, fusedpref's
    gradients-in-forward pass taken where its row says so."""
    optional("trl")
    proc = subprocess.run([sys.executable, "bench/trl_step.py", "--vocab", "512", "--hidden", "32", "--tokens", "16",
                           "--pairs", "2", "--steps", "2", "--kept-mb", "64"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    rows = {r[0].strip(): r for r in rows[1:]}
    assert len(rows) == 4, proc.stdout
    firsts = [float(r[3].split("/")[0]) for r in rows.values()]
    assert max(firsts) - min(firsts) < 1e-5, proc.stdout
    passes = {name: int(r[4]) for name, r in rows.items()}
    assert passes["fusedpref (patch_trl), gradients in forward"] == 2
    assert passes["fusedpref (patch_trl), recompute path"] == 0


def test_the_whole_step_benchmark_rejects_bad_flags():
    proc = subprocess.run([sys.executable, "bench/trl_step.py", "--heads", "fusedpref,nope"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--heads" in proc.stderr, proc.stderr
