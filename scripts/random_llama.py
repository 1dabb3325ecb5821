"""Build a randomly initialised Llama of a given size as a local model directory (no download): the scale
check of BENCHMARKS.md runs `hyft bench --model runs/llama-1b-random` on it. The tokenizer is SmolLM2's."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hyft.models import model_dir

SHAPES = {  # TinyLlama-1.1B's shape with SmolLM2's vocabulary, untied like Llama-2/3
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="1b", choices=list(SHAPES))
    parser.add_argument("--out", default="runs/llama-1b-random")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="stored dtype (bfloat16: the same weights, cast, so a bf16 run loads no fp32 copy)")
    args = parser.parse_args()
    source = Path(model_dir("smollm2-135m"))
    out = Path(args.out)
    if (out / "config.json").is_file():
        print(f"{out} exists")
        return
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, tie_word_embeddings=False, max_position_embeddings=2048,
                         **SHAPES[args.size])
    model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    model.save_pretrained(out)
    for f in source.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    print(f"{out}: {sum(p.numel() for p in model.parameters()):,} parameters, untied")


if __name__ == "__main__":
    main()
