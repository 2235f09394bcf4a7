"""Every script of examples/ runs offline on the CPU, with a few steps, and says what it trained."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import optional

pytestmark = pytest.mark.slow   # the examples in subprocesses

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RUNS = {"dpo.py": (["--steps", "5"], "rewards/accuracies"), "expo.py": (["--steps", "5"], "kl/chosen"),
        "lora_dpo.py": (["--steps", "5"], "LoRA DPO: loss"), "distill.py": (["--steps", "3"], "divergence"),
        "expo.py --lora": (["--steps", "5", "--lora"], "kl/chosen")}


def test_every_example_is_run_here():
    assert {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")} == {k.split()[0] for k in RUNS}


@pytest.mark.parametrize("name", list(RUNS))
def test_example_runs(name):
    optional("trl")
    optional("peft")
    argv, expect = RUNS[name]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / name.split()[0]), *argv], capture_output=True, text=True,
                          env=env, timeout=300, cwd=EXAMPLES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expect in proc.stdout, proc.stdout[-2000:]
