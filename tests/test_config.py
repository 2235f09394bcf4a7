"""The knobs of fusedpref.config: opt-in autotuning, the chunk budget and column override."""
import pytest
import torch

from fusedpref import _chunks, config


def test_autotune_is_opt_in(monkeypatch):
    monkeypatch.delenv("FUSEDPREF_AUTOTUNE", raising=False)
    assert not config.autotune_enabled()
    monkeypatch.setenv("FUSEDPREF_AUTOTUNE", "1")
    assert config.autotune_enabled()


def test_autotune_keeps_the_fastest_candidate_skips_failures_and_caches(monkeypatch):
    import triton.testing

    speed = {c: 5.0 + i for i, c in enumerate(config.AUTOTUNE_CANDIDATES)}
    fastest = config.AUTOTUNE_CANDIDATES[2]
    speed[fastest] = 0.5
    broken = config.AUTOTUNE_CANDIDATES[0]
    timed = []

    def fake_bench(fn):
        return fn()

    def run(tiles):
        timed.append(tiles)
        if tiles == broken:      # e.g. too much shared memory on this GPU
            raise RuntimeError("out of resources")
        return speed[tiles]

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(config, "_TUNED", {})
    assert config.autotuned(("fwd", torch.bfloat16, 0, 1024), run) == fastest
    assert len(timed) == len(config.AUTOTUNE_CANDIDATES)
    assert config.autotuned(("fwd", torch.bfloat16, 0, 1024), run) == fastest
    assert len(timed) == len(config.AUTOTUNE_CANDIDATES)         # cached per key
    with pytest.raises(RuntimeError, match="no candidate config ran"):
        config.autotuned(("dz",), lambda tiles: (_ for _ in ()).throw(RuntimeError("no")))


def test_chunk_budget_and_column_override(monkeypatch):
    monkeypatch.delenv("FUSEDPREF_CHUNK_COLS", raising=False)
    monkeypatch.setenv("FUSEDPREF_CHUNK_MB", "1")
    assert _chunks.vocab_chunk_cols(256, 10**6, 4, align=64) == 1024        # 1 MiB / (256 rows x 4 B)
    monkeypatch.setenv("FUSEDPREF_CHUNK_COLS", "97")
    assert _chunks.vocab_chunk_cols(256, 10**6, 4, align=64) == 97          # exact, not aligned
    assert list(_chunks.vocab_chunks(200, 97)) == [(0, 97), (97, 194), (194, 200)]
    for bad in ("0", "x"):
        monkeypatch.setenv("FUSEDPREF_CHUNK_COLS", bad)
        with pytest.raises(ValueError, match="FUSEDPREF_CHUNK_COLS"):
            config.chunk_cols()
    monkeypatch.delenv("FUSEDPREF_CHUNK_COLS")
    monkeypatch.setenv("FUSEDPREF_CHUNK_MB", "-1")
    with pytest.raises(ValueError, match="FUSEDPREF_CHUNK_MB"):
        config.chunk_bytes()
