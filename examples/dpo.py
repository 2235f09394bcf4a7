"""DPO with TRL's DPOTrainer on fusedpref's fused head: one line, patch_trl().

    python examples/dpo.py [--steps 20] [--loss-type sigmoid] [--unpatched]
"""
import argparse
import tempfile

import _tiny
from trl import DPOConfig, DPOTrainer

import fusedpref.integrations.trl as fp_trl

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--loss-type", default="sigmoid", help="any DPOTrainer loss type, e.g. ipo, hinge, apo_zero")
parser.add_argument("--unpatched", action="store_true", help="run TRL's own fused head instead")
args = parser.parse_args()

if not args.unpatched:
    fp_trl.patch_trl()          # the one line: every fused head TRL calls is fusedpref's now
with tempfile.TemporaryDirectory() as out:
    trainer = DPOTrainer(model=_tiny.model(), ref_model=_tiny.model(),
                         args=DPOConfig(**_tiny.common_args(out, args.steps), per_device_train_batch_size=4,
                                        loss_type=args.loss_type),
                         train_dataset=_tiny.preference_data(), processing_class=_tiny.tokenizer())
    trainer.train()
rows = [r for r in trainer.state.log_history if "loss" in r]
print(f"{args.loss_type}: loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}, "
      f"rewards/accuracies {rows[-1]['rewards/accuracies']:.2f}")
