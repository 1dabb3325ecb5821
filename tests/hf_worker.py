"""One HybridTrainer run on the tiny model, as a rank of ``torchrun`` or as one process (tests/test_hf_trainer.py):
sequences of different lengths, so ranks hold different label-token counts; writes what the test compares."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import SequentialSampler
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

import hyft

TEXTS = ["the film was great fun and the cast was superb", "a dull mess", "great acting, great story, great fun",
         "boring", "not what I hoped for at all, sadly", "a joy", "the plot makes no sense whatsoever", "fine"]


def rows(tokenizer, n: int = 24) -> list[dict]:
    out = []
    for i in range(n):
        ids = tokenizer(TEXTS[i % len(TEXTS)], padding="max_length", max_length=14, truncation=True)
        out.append({"input_ids": ids.input_ids, "attention_mask": ids.attention_mask,
                    "labels": [t if m else -100 for t, m in zip(ids.input_ids, ids.attention_mask, strict=True)]})
    return out


class InOrder(hyft.HybridTrainer):
    """File order: the global batch of step k is the same examples on 1 or 2 processes."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def main(tiny_dir: str, out: str, per_device: int, steps: int) -> None:
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=per_device,
                             learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to=[], seed=0,
                             lr_scheduler_type="constant", use_cpu=True, disable_tqdm=True, optim="sgd",
                             ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None)
    trainer = InOrder(model=model, args=args, train_dataset=rows(AutoTokenizer.from_pretrained(tiny_dir)),
                      hybrid_args=hyft.HybridArguments(lr_zo=1e-3, eps=1e-2))
    trainer.train()
    base = b"".join(p.detach().numpy().tobytes() for n, p in sorted(model.named_parameters()) if "lora_" not in n)
    lora = b"".join(p.detach().numpy().tobytes() for n, p in sorted(model.named_parameters()) if "lora_" in n)
    rank = int(os.environ.get("RANK", "0"))
    torch.save({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}, Path(out, f"phi{rank}.pt"))
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "theta": hashlib.sha256(base).hexdigest(), "phi": hashlib.sha256(lora).hexdigest(),
        "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
