"""The table, the CSV columns and the plot."""
from __future__ import annotations

import datetime
import os
import subprocess

import torch



# ----------------------------------------------------------------------------- reporting

def _meta(device, dtype):
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "none"
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        commit = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{os.cpu_count()}"
    return {"date": datetime.date.today().isoformat(), "commit": commit, "device": name,
            "torch": torch.__version__, "triton": tv, "dtype": str(dtype).split(".")[1],
            "chunk_mb": os.environ.get("FUSEDPREF_CHUNK_MB", "default")}


def _fmt(x):
    if isinstance(x, float):
        return "nan" if x != x else f"{x:.3g}" if abs(x) < 1e-2 or abs(x) >= 1e4 else f"{x:.4g}"
    return str(x)


# CSV columns first in this order (then any others, sorted): what ran, where, then the figures
CSV_COLS = ["date", "commit", "device", "torch", "triton", "dtype", "chunk_mb", "provider", "status", "sweep",
            "loss_type", "beta", "frozen", "pairs", "seq", "tokens", "n_valid", "d", "v", "fwd_ms", "bwd_ms",
            "fwd_bwd_ms", "peak_mb", "extra_mb", "flops", "tflops", "matmul_peak_tflops", "pct_of_peak", "err_loss",
            "err_dh", "err_dw"]
TABLE_COLS = ["provider", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "peak_mb", "extra_mb", "tflops", "pct_of_peak",
              "err_loss", "err_dh", "err_dw", "status"]


def print_table(rows, meta, shape, peak, n_valid, units, loss_type, beta):
    pairs, seq, d, v = shape
    print(f"# {meta['date']}  {meta['device']}  commit {meta['commit']}  torch {meta['torch']}  "
          f"triton {meta['triton']}  FUSEDPREF_CHUNK_MB={meta['chunk_mb']}")
    print(f"# {pairs} pairs x {seq} tokens ({n_valid} valid), D={d}, V={v}, {meta['dtype']}, loss {loss_type} (beta {beta:g}); "
          f"measured matmul peak {peak:.3g} TFLOP/s; TFLOP/s counts {units}*N_valid*D*V")
    print("| " + " | ".join(TABLE_COLS) + " |")
    print("|" + "---|" * len(TABLE_COLS))
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c, "")) for c in TABLE_COLS) + " |")


def plot(sweep_rows, path, caption=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for prov in sorted({r["provider"] for r in sweep_rows}):
        mem = sorted((r["v"], r["peak_mb"]) for r in sweep_rows if r["provider"] == prov and r["sweep"] == "vocab"
                     and "peak_mb" in r)
        tim = sorted((r["tokens"], r["fwd_bwd_ms"]) for r in sweep_rows if r["provider"] == prov
                     and r["sweep"] == "tokens" and "fwd_bwd_ms" in r)
        if mem:
            a.plot(*zip(*mem), marker="o", label=prov)
        if tim:
            b.plot(*zip(*tim), marker="o", label=prov)
    a.set(xlabel="vocabulary size V", ylabel="peak memory above inputs (MB)", title="memory vs vocabulary")
    b.set(xlabel="tokens (2B x T)", ylabel="forward+backward (ms)", title="time vs tokens")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    if caption:
        fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
