"""LoRA DPO with TRL's DPOTrainer on fusedpref's head: the reference is the base model with the
adapters disabled (TRL's own mechanism), so there is no second model in memory.

    python examples/lora_dpo.py [--steps 20]
"""
import argparse
import tempfile

import _tiny
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

import fusedpref.integrations.trl as fp_trl

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=20)
args = parser.parse_args()

fp_trl.patch_trl()
with tempfile.TemporaryDirectory() as out:
    trainer = DPOTrainer(model=_tiny.model(), ref_model=None,
                         args=DPOConfig(**_tiny.common_args(out, args.steps, 3e-2), per_device_train_batch_size=4),
                         train_dataset=_tiny.preference_data(), processing_class=_tiny.tokenizer(),
                         peft_config=LoraConfig(r=8, lora_alpha=16,
                                                target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    trainer.train()
rows = [r for r in trainer.state.log_history if "loss" in r]
print(f"LoRA DPO: loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}, "
      f"rewards/accuracies {rows[-1]['rewards/accuracies']:.2f}")
