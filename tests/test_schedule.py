"""Program order and the traffic model. The kernels map a linear program id to a tile with the
@triton.jit helpers of kernels/schedule.py; a probe kernel here calls the same helpers in the
interpreter and records the map, and the tests check the property the L2 model relies on:
programs dispatched together (neighbouring ids) share row blocks."""
import math

import pytest
import torch
import triton
import triton.language as tl

from helpers import DEVICE
from fusedpref import schedule
from fusedpref.kernels.schedule import grouped, split_major


@triton.jit
def _probe(out_ptr, n_m, n_n, n_splits, GROUPED: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    if GROUPED:
        a, b = grouped(pid, n_m, n_n, GROUP_M)
    else:
        a, b = split_major(pid, n_splits)
    tl.store(out_ptr + 2 * pid, a)
    tl.store(out_ptr + 2 * pid + 1, b)


def _map(n_programs, **kw):
    out = torch.full((n_programs, 2), -1, dtype=torch.int32, device=DEVICE)
    _probe[(n_programs,)](out, kw.get("n_m", 1), kw.get("n_n", 1), kw.get("n_splits", 1),
                          GROUPED=kw.get("grouped", False), GROUP_M=kw.get("group_m", 8))
    return out.cpu().tolist()


@pytest.mark.parametrize("n_blocks,splits,resident", [(13, 6, 8), (128, 6, 132), (5, 3, 4)])
def test_forward_order_resident_programs_share_row_blocks(n_blocks, splits, resident):
    got = _map(n_blocks * splits, n_splits=splits)
    assert sorted(map(tuple, got)) == [(r, s) for r in range(n_blocks) for s in range(splits)]   # a bijection
    for start in range(0, len(got) - resident + 1):
        window = got[start:start + resident]
        assert len({r for r, _ in window}) <= math.ceil(resident / splits) + 1
        assert len({s for _, s in window}) == min(splits, resident)           # every split's W stream


@pytest.mark.parametrize("n_m,n_n,group_m,resident", [
    (20, 7, 8, 16), pytest.param(128, 64, 8, 132, marks=pytest.mark.slow), (3, 5, 8, 4)])   # (8192 programs: 11 s)
def test_grouped_order_resident_programs_share_rows_and_columns(n_m, n_n, group_m, resident):
    got = _map(n_m * n_n, n_m=n_m, n_n=n_n, grouped=True, group_m=group_m)
    assert sorted(map(tuple, got)) == [(m, n) for m in range(n_m) for n in range(n_n)]
    for start in range(0, len(got) - resident + 1):
        window = got[start:start + resident]
        assert len({m for m, _ in window}) <= min(n_m, 2 * group_m)          # at most two bands at a seam
        smallest_band = n_m % group_m or min(group_m, n_m)      # the last band may be narrower
        assert len({n for _, n in window}) <= math.ceil(resident / smallest_band) + 2


def test_split_count_fits_the_resident_h_blocks_in_l2():
    # main shape, H200: 128 row blocks of 128 x 4096 bf16 (1 MiB each), 132 SMs, 50 MiB L2
    s = schedule.forward_splits(16384, 128256, 4096, 2, 128, 64, 132, 50 * 2**20)
    assert s >= 6 and math.ceil(132 / s) * 2**20 <= 25 * 2**20
    assert schedule.forward_splits(16384, 128256, 4096, 2, 128, 64, 132, 50 * 2**20) == s   # deterministic
    # few rows: enough splits to give every SM a program; never more splits than tiles
    assert schedule.forward_splits(100, 128256, 4096, 2, 128, 64, 132, 50 * 2**20) >= 132
    assert schedule.forward_splits(100, 300, 64, 2, 128, 64, 132, 50 * 2**20) == 5


def test_roofline_at_the_main_shape():
    rows, summary = schedule.model(16384, 4096, 128256, "bf16", "H200")
    fwd = rows[0]
    assert fwd["kernel"].startswith("forward") and fwd["gbytes"] <= 20          # split-major order
    assert summary["row_major_fwd_gbytes"] > 200                              # what row-major would move
    assert summary["total_bound_ms"] <= 1.25 * summary["floor_ms"]
    assert summary["chunk_cols"] == 8192 and summary["chunks"] == 16
    assert math.isclose(sum(r["gflop"] for r in rows), 8 * 16384 * 4096 * 128256 / 1e9)
    std, ss = schedule.model(16384, 4096, 128256, "bf16", "H200", frozen=True, frozen_path="standard")
    assert len(std) == 3 and math.isclose(sum(r["gflop"] for r in std), 6 * 16384 * 4096 * 128256 / 1e9)
    one, so = schedule.model(16384, 4096, 128256, "bf16", "H200", frozen=True)     # the one-pass default
    assert math.isclose(sum(r["gflop"] for r in one), 4 * 16384 * 4096 * 128256 / 1e9) and so["units"] == 4
    # modelled: the one-pass frozen path's lower bound within 0.75x of the standard frozen path's
    assert so["total_bound_ms"] <= 0.75 * ss["total_bound_ms"]


def test_roofline_of_the_gradients_in_forward_path():
    """6 N D V; chunks of pairs as the kept budget holds them (a 4096-row pair of bf16 P at
    V = 128256 is 1002 MiB: one per chunk in 1024 MiB); modelled below the recompute path's bound."""
    rows, summary = schedule.model(16384, 4096, 128256, "bf16", "H200", kept=True)
    recompute = schedule.model(16384, 4096, 128256, "bf16", "H200")[1]
    assert math.isclose(sum(r["gflop"] for r in rows), 6 * 16384 * 4096 * 128256 / 1e9) and summary["units"] == 6
    assert summary["pair_chunks"] == 4
    assert summary["total_bound_ms"] <= 0.85 * recompute["total_bound_ms"]
    assert schedule.model(16384, 4096, 128256, "bf16", "H200", kept=True, kept_mb=4096)[1]["pair_chunks"] == 1
    # a pair too large for the budget: the recompute path (as fusedpref._library.fused_loss's default)
    assert schedule.model(16384, 4096, 128256, "bf16", "H200", kept=True, kept_mb=100)[1]["units"] == 8


def test_roofline_command_prints_the_table():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fusedpref.cli", "roofline", "--gpu", "H100"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ESTIMATES" in proc.stdout and "| forward (logprob_fwd) |" in proc.stdout and "H100" in proc.stdout
    kept = subprocess.run([sys.executable, "-m", "fusedpref.cli", "roofline", "--kept"], capture_output=True,
                          text=True, timeout=120)
    assert kept.returncode == 0 and "| kept_dz (dz from P, in place) |" in kept.stdout, kept.stderr
    both = subprocess.run([sys.executable, "-m", "fusedpref.cli", "roofline", "--kept", "--frozen"],
                          capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and "--kept" in both.stderr
