"""EXPO (Bradley-Terry on the policy's own log-probs + lambda KL(pi_ref || pi_theta), the KL exact
over the vocabulary) in TRL's own DPOTrainer: DPOConfig(loss_type="expo", beta=lambda) after
patch_trl(). Optionally a LoRA policy (the reference is the base model, adapters disabled).

    python examples/expo.py [--steps 20] [--lora] [--beta 0.5]
"""
import argparse
import tempfile

import _tiny
from trl import DPOConfig, DPOTrainer

import fusedpref.integrations.trl as fp_trl

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--beta", type=float, default=0.5, help="lambda, the weight of the vocabulary KL")
parser.add_argument("--lora", action="store_true", help="train a LoRA adapter (needs peft)")
args = parser.parse_args()

fp_trl.patch_trl()
extra = {}
if args.lora:
    from peft import LoraConfig

    extra["peft_config"] = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
with tempfile.TemporaryDirectory() as out:
    trainer = DPOTrainer(model=_tiny.model(), ref_model=None if args.lora else _tiny.model(),
                         args=DPOConfig(**_tiny.common_args(out, args.steps, 3e-2 if args.lora else 3e-3),
                                        per_device_train_batch_size=4, loss_type="expo", beta=args.beta),
                         train_dataset=_tiny.preference_data(), processing_class=_tiny.tokenizer(), **extra)
    trainer.train()
rows = [r for r in trainer.state.log_history if "loss" in r]
for r in rows:
    print(f"step {r['step']:3d}  loss {r['loss']:.4f}  rewards/accuracies {r['rewards/accuracies']:.2f}  "
          f"kl/chosen {r['kl/chosen']:.4f}")
