"""TRL trainers patched vs unpatched: shared by tests/test_trl_trainers.py and test_trl_expo.py.
The tiny offline models, tokenizer and datasets are the examples' (examples/_tiny.py)."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from _tiny import (VOCAB, length_reward, model, preference_data, prompt_data, text_data,  # noqa: E402,F401
                   tokenizer, unpaired_data)


@contextlib.contextmanager
def patched(on: bool):
    import fusedpref.integrations.trl as fp_trl

    fp_trl.patch_trl() if on else fp_trl.unpatch_trl()
    try:
        yield
    finally:
        fp_trl.unpatch_trl()


def train(make_trainer, on: bool):
    """Runs make_trainer() (patched or not); returns (log rows with a loss, named trainable weights)."""
    with patched(on):
        trainer = make_trainer()
        trainer.train()
    logs = [row for row in trainer.state.log_history if "loss" in row]
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return logs, weights, trainer
