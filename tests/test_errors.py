"""Bad input gets a clear error naming the argument; edge cases work."""
import pytest
import torch

import fusedpref
from helpers import DEVICE

V, D = 50, 16


def _ok():
    return (torch.randn(2, 3, D, device=DEVICE), torch.randn(V, D, device=DEVICE),
            torch.randint(0, V, (2, 3), device=DEVICE))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case, exc, words", [
    ("targets_shape", ValueError, ["targets", "leading dims"]),
    ("weight_d", ValueError, ["weight", "D=17", "hidden"]),
    ("bias_len", ValueError, ["bias", "[V]=[50]"]),
    ("dtype_mismatch", TypeError, ["weight dtype", "hidden dtype"]),
    ("int_hidden", TypeError, ["hidden", "float32"]),
    ("float_targets", TypeError, ["targets", "integer"]),
    ("target_range", ValueError, ["targets", "[0, V=50)", "ignore_index=-100", "found 50"]),
    ("negative_target", ValueError, ["targets", "found -3"]),
    ("device", ValueError, ["weight", "meta", "hidden"]),
    ("softcap_zero", ValueError, ["softcap", "positive"]),
    ("softcap_neg", ValueError, ["softcap", "positive"]),
    ("softcap_type", TypeError, ["softcap"]),
    ("backend", ValueError, ["backend", "'auto'"]),
    ("weight_1d", ValueError, ["weight", "[V, D]"]),
])
def test_bad_input(backend, case, exc, words):
    h, w, y = _ok()
    kw = {"backend": backend}
    if case == "targets_shape":
        y = y[:, :2]
    elif case == "weight_d":
        w = torch.randn(V, D + 1, device=DEVICE)
    elif case == "bias_len":
        kw["bias"] = torch.randn(V - 1, device=DEVICE)
    elif case == "dtype_mismatch":
        w = w.half()
    elif case == "int_hidden":
        h = h.long()
        w = w.long()
    elif case == "float_targets":
        y = y.float()
    elif case == "target_range":
        y[0, 0] = V
    elif case == "negative_target":
        y[1, 2] = -3
    elif case == "device":
        w = torch.randn(V, D, device="meta")
    elif case == "softcap_zero":
        kw["softcap"] = 0.0
    elif case == "softcap_neg":
        kw["softcap"] = -1.0
    elif case == "softcap_type":
        kw["softcap"] = "30"
    elif case == "backend":
        kw["backend"] = "cuda"
    elif case == "weight_1d":
        w = torch.randn(V * D, device=DEVICE)
    with pytest.raises(exc) as info:
        fusedpref.linear_logprobs(h, w, y, **kw)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_custom_ignore_index_is_respected():
    h, w, y = _ok()
    y[y == 7] = 8                   # (unseeded targets: only the one set below may be 7)
    y[0, 0] = 7
    a = fusedpref.linear_logprobs(h, w, y, ignore_index=7, backend="torch")
    assert a[0, 0] == 0 and (a.flatten()[1:] < 0).all()
    with pytest.raises(ValueError, match="ignore_index=7"):
        y[0, 1] = -100
        fusedpref.linear_logprobs(h, w, y, ignore_index=7, backend="torch")


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU-only rule")
def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h, w, y = _ok()
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        fusedpref.linear_logprobs(h, w, y, backend="triton")
    # auto picks the torch backend on the CPU
    assert fusedpref.linear_logprobs(h, w, y, backend="auto").shape == y.shape
