"""`fusedpref bench` runs end to end (tiny shape), prints the table, writes CSV and PNG."""
import csv
import os
import subprocess
import sys


def test_bench_command_writes_table_csv_png(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEDPREF_POISON")}
    cmd = [sys.executable, "-m", "fusedpref.cli", "bench", "--pairs", "2", "--seq", "64", "--d", "32",
           "--v", "32000", "--repeats", "1", "--out", str(tmp_path), "--tag", "test"]
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
