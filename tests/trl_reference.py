"""The independent eager reference of the preference losses lives in fusedpref.reference (one
copy, shared with the benchmark's error column); this module keeps the tests' names for it."""
from fusedpref.reference import _seq_logps, eager_kto_loss, eager_preference_loss  # noqa: F401


def trl_loss(*args, **kwargs):
    return eager_preference_loss(*args, **kwargs)


def _batch_logps(hidden, weight, bias, targets, ignore_index, softcap):
    return _seq_logps(hidden, weight, bias, targets, ignore_index, softcap)
