"""On-policy distillation with TRL's DistillationTrainer on fusedpref's divergence head (beta 0:
forward KL(teacher || student), 1: reverse KL, between: the generalised JSD); the teacher is
wider than the student.

    python examples/distill.py [--steps 10] [--beta 0.5]
"""
import argparse
import tempfile

import _tiny
from trl.trainer.distillation_config import DistillationConfig
from trl.trainer.distillation_trainer import DistillationTrainer

import fusedpref.integrations.trl as fp_trl

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--beta", type=float, default=0.5)
args = parser.parse_args()

fp_trl.patch_trl()
with tempfile.TemporaryDirectory() as out:
    trainer = DistillationTrainer(model=_tiny.model(), teacher_model=_tiny.model(seed=1, hidden=48),
                                  args=DistillationConfig(**_tiny.common_args(out, args.steps),
                                                          per_device_train_batch_size=4, max_completion_length=6,
                                                          beta=args.beta),
                                  train_dataset=_tiny.prompt_data(), processing_class=_tiny.tokenizer())
    trainer.train()
rows = [r for r in trainer.state.log_history if "loss" in r]
print(f"beta {args.beta}: divergence {rows[0]['loss']:.5f} -> {rows[-1]['loss']:.5f}, "
      f"student entropy {rows[-1]['entropy']:.3f}")
