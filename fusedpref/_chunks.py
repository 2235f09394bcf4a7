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
    cols = config.chunk_bytes(default_mb) // max(1, n_rows * elem_bytes)
    cols = max(align, cols // align * align)
    if max_cols is not None and config.chunk_bytes_set() is False:
        cols = min(cols, max(align, max_cols))     # the default: a column cap, FUSEDPREF_CHUNK_MB lifts it
    return min(cols, vocab)


def vocab_chunks(vocab: int, cols: int):
    for v0 in range(0, vocab, cols):
        yield v0, min(vocab, v0 + cols)
