"""Why the engine's ZO step was slow on the H200: its kernel launches per step (counted here, on meta tensors)
against the perturb and update seconds the first lease measured (docs/gpu/bench*.json), row by row.

For each ZO row of those bench files, on the same model shape (TinyLlama's 1.17 B Llama, bf16, batch 8 × 128
tokens): the launches of an update sweep and of two perturbed forwards beyond two plain ones, with torch's ops
(what ran then) and with the fused device kernels (``hyft.engine.device_kernel``); then the measured perturb
and update seconds divided by the torch-op launches: the time per launch those rows imply. MeZO's reference
is counted the same way (4 sweeps of ``torch.normal`` + ``add_`` a step).

    python scripts/launch_budget.py            # prints a markdown table; ~1 min on 2 cores
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hyft.engine import device_kernel
from hyft.engine.zo import ZOEngine, ZOUpdate, select_params
from hyft.tools.bench.launches import count, mezo_sweep_launches, perturbed_forward_launches

ROOT = Path(__file__).resolve().parents[1]
BENCH = [ROOT / "docs/gpu/bench.json", ROOT / "docs/gpu/bench-stochastic-sweeps.json"]
ROWS = {  # (bench file, row) → the engine that row builds (hyft bench's defaults: Rademacher z)
    ("bench", "zo-full-in-place"): dict(dist="rademacher", compensate=True, rounding="nearest"),
    ("bench-stochastic-sweeps", "zo-full-stochastic"): dict(dist="rademacher", compensate=False,
                                                            rounding="stochastic"),
}


def main() -> None:
    config = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    params = select_params(model)
    tokens = 8 * 128
    measured = {path.stem: json.loads(path.read_text())["rows"] for path in BENCH}
    print(f"{len(params)} ZO tensors, {sum(p.numel() for _, p in params):,} weights, bf16, {tokens} tokens\n")
    print("| row | launches a step, torch ops (update + 2 perturbed forwards) | with the fused kernels | "
          "measured perturb + update s | µs per torch-op launch |")
    print("|---|---|---|---|---|")
    for (file, row), kwargs in ROWS.items():
        engine = ZOEngine(model, params, eps=1e-3, two_sided=True, **kwargs)
        counts = {}
        for fused in (False, True):
            with torch.no_grad(), (device_kernel.counting_on_meta() if fused else device_kernel.disabled()):
                update = count(lambda engine=engine: engine.update(ZOUpdate(step=0, seed=1, coef=1.0, lr=1e-6)))
                forward = perturbed_forward_launches(engine, model, tokens)
            counts[fused] = (update, 2 * forward)
        seconds = measured[file][row]["seconds"]
        spent = seconds["perturb"] + seconds["update"]
        update, forwards = counts[False]
        print(f"| {row} ({file}.json) | {update + forwards:,} ({update:,} + {forwards:,}) | {sum(counts[True]):,} | "
              f"{spent:.4f} ({seconds['perturb']:.4f} + {seconds['update']:.4f}) | "
              f"{1e6 * spent / (update + forwards):.1f} |")
    sweep = mezo_sweep_launches(params)
    for file, rows in measured.items():
        seconds = rows["mezo"]["seconds"]
        spent = seconds["perturb"] + seconds["update"]
        print(f"| mezo, reference ({file}.json) | {4 * sweep:,} (4 sweeps of {sweep:,}) | — | "
              f"{spent:.4f} ({seconds['perturb']:.4f} + {seconds['update']:.4f}) | {1e6 * spent / (4 * sweep):.1f} |")


if __name__ == "__main__":
    main()
