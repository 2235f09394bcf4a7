"""Program order: which tile a program id works on. Blocks are dispatched in increasing linear
program id, so programs that run at the same time have neighbouring ids; these maps make such
neighbours share the operand they re-read, so it stays in L2 (fusedpref/schedule.py models the
bytes each order moves).

    split_major(pid, n_splits)        forward kernels: the vocabulary split varies fastest, so the
                                      programs resident at once cover few row blocks of H (each
                                      re-read once per vocabulary tile) and every split's W tiles
    grouped(pid, n_m, n_n, GROUP_M)   GEMM-like kernels (dz, mm_acc): GROUP_M row blocks vary
                                      fastest within a band of column tiles, so both the H rows and
                                      the W columns of the resident programs fit in L2
"""
import triton
import triton.language as tl


@triton.jit
def split_major(pid, n_splits):
    """(row block, vocabulary split) of a linear program id; the split varies fastest."""
    return pid // n_splits, pid % n_splits


@triton.jit
def grouped(pid, n_m, n_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of a linear program id: bands of GROUP_M row tiles, the row tile
    varying fastest inside a band, the band sweeping every column tile before the next one."""
    width = GROUP_M * n_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m
