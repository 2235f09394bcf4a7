"""Vocabulary chunking shared by both backends: the only buffer that grows with V is one
rows x chunk_columns block, bounded by config.chunk_bytes()."""
from __future__ import annotations

from . import config


def vocab_chunk_cols(n_rows: int, vocab: int, elem_bytes: int, align: int = 1, default_mb: float = 32,
                     max_cols: int | None = None) -> int:
    """Columns per chunk so that n_rows x cols x elem_bytes <= the chunk budget (>= align), or
    exactly FUSEDPREF_CHUNK_COLS columns when that is set (not aligned: tests use it to put chunk
    boundaries inside a tile)."""
    fixed = config.chunk_cols()
    if fixed is not None:
        return min(fixed, vocab)
    # the default: a column cap as well as the budget; FUSEDPREF_CHUNK_MB replaces both
    cap = None if config.chunk_bytes_set() else max_cols
    return budget_cols(n_rows, vocab, elem_bytes, align, config.chunk_bytes(default_mb), cap)


def budget_cols(n_rows: int, vocab: int, elem_bytes: int, align: int, budget_bytes: int,
                max_cols: int | None = None) -> int:
    """Columns so that n_rows x cols x elem_bytes <= budget_bytes, a multiple of align (>= align),
    at most max_cols and V (no environment: fusedpref.schedule models with it too)."""
    cols = budget_bytes // max(1, n_rows * elem_bytes)
    cols = max(align, cols // align * align)
    if max_cols is not None:
        cols = min(cols, max(align, max_cols))
    return min(cols, vocab)


def vocab_chunks(vocab: int, cols: int):
    for v0 in range(0, vocab, cols):
        yield v0, min(vocab, v0 + cols)
