"""bench/gpu_check.sh: its plan fits the GPU lease, and a CPU dry run of its whole flow (smoke,
kernel timing, core table, sweep, EXPO, tests; tiny shapes, Triton interpreter) passes."""
import os
import re
import subprocess
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("gloo")]   # bench/gpu_check.sh in a subprocess (a gloo port)


def test_plan_fits_in_480_seconds():
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--plan"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    total = int(re.search(r"^total\s+(\d+) s", proc.stdout, re.M).group(1))
    steps = re.findall(r"^(\w+)\s+(\d+) s", proc.stdout, re.M)
    assert total <= 480 and total == sum(int(b) for n, b in steps if n != "total")
    assert [n for n, _ in steps][:3] == ["install", "smoke", "kernels"]     # what localises a failure first


def test_cpu_dry_run_of_the_flow(tmp_path):
    env = dict(os.environ)
    env.update(DRY_RUN="1", OUT=str(tmp_path), PYTHON=__import__("sys").executable)
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], capture_output=True, text=True, env=env, timeout=600)
    log = (tmp_path / "check.txt").read_text()
    assert proc.returncode == 0, log[-4000:]
    smoke = [line for line in log.splitlines() if line.startswith("smoke ")]
    # 4 paths on the main shape, 12 (+ the divergences with statistics, two frozen heads, two
    # vocabulary-parallel paths in a one-rank group, a loss and EXPO with gradients in forward) on the
    # misaligned one
    assert len(smoke) == 3 * (4 + 12) and all(" ok " in line for line in smoke), smoke
    assert "loss:in-forward" in log and "expo:in-forward" in log
    assert "kernel preference_loss gradients in forward" in log and "kernel torch F.linear_cross_entropy" in log
    assert "no process group" not in log and "vp:frozen" in log
    assert "kernel frozen head: one-pass / standard" in log
    assert "kernel dz (recompute) chunk" in log and "backend=triton" in log and "backend=torch" in log
    assert "| fused-torch |" in log and "passed" in log and ": exit" not in log
    assert len(list(tmp_path.iterdir())) <= 8
    for name in ("env.txt", "check.txt", "kernels.jsonl", "bench-core.csv", "bench-sweep.csv"):
        assert (tmp_path / name).exists(), name
