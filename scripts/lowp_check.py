"""How far a few zo-full steps move SmolLM2's weights in fp32 and in bf16 (with the residual, without it, and
with seeded stochastic rounding instead): the acceptance check of low-precision ZO. Same seed, same batches;
prints mean |Δθ| and the projection of each run's displacement on the fp32 run's (1 = the same move on
average), and writes JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hyft.config import RunConfig
from hyft.methods import METHODS, Objective
from hyft.methods.params import prepare
from hyft.models import load_model
from hyft.tasks import get_task, sample_splits
from hyft.training.sampler import EpochSampler


def moved(dtype: str, compensate: bool, steps: int, lr: float, batch: int, rounding: str = "nearest"
          ) -> tuple[dict[str, float], torch.Tensor]:
    config = RunConfig(method="zo-full", dtype=dtype, lr_zo=lr, zo_compensate=compensate, batch_size=batch,
                       zo_rounding=rounding)
    splits = sample_splits(get_task("sst2"), 0, 1000, 0, 10)
    model, tokenizer = load_model("smollm2-135m", dtype)
    model, groups = prepare(model, config)
    start = [p.detach().float().clone() for _, p in groups.zo]
    method = METHODS["zo-full"].rule(model, groups, Objective(model, tokenizer, config), config, total=steps)
    sampler = EpochSampler(len(splits.train), batch, "reshuffle", 0)
    losses = [method.step([splits.train[i] for i in sampler.next_batch()], s).loss for s in range(steps)]
    residuals = method.engine.residuals
    true = torch.cat([(p.detach().float() + (0 if r is None else r.float()) - s).flatten()
                      for (_, p), r, s in zip(groups.zo, residuals, start, strict=True)])
    stored = torch.cat([(p.detach().float() - s).abs().flatten() for (_, p), s in zip(groups.zo, start, strict=True)])
    return {"mean_abs_change": true.abs().mean().item(), "mean_abs_change_stored": stored.mean().item(),
            "fraction_stored_changed": (stored > 0).float().mean().item(), "losses": losses}, true


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="runs/lowp_check.json")
    args = parser.parse_args()
    cases = [("float32", "float32", True, "nearest"), ("bfloat16", "bfloat16", True, "nearest"),
             ("bfloat16-no-residual", "bfloat16", False, "nearest"),
             ("bfloat16-stochastic", "bfloat16", False, "stochastic")]
    results, reference = {}, None
    for name, dtype, comp, rounding in cases:
        results[name], move = moved(dtype, comp, args.steps, args.lr, args.batch_size, rounding)
        reference = move if reference is None else reference
        results[name]["projection_on_fp32"] = (move @ reference / (reference @ reference)).item()
    results["setup"] = vars(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    ref = results["float32"]["mean_abs_change"]
    for name, *_ in cases:
        r = results[name]
        print(f"{name:22s} mean|Δθ| {r['mean_abs_change']:.3e} ({r['mean_abs_change'] / ref:.2f}× fp32), projection "
              f"on fp32's move {r['projection_on_fp32']:.2f}; stored weights {r['mean_abs_change_stored']:.3e}, "
              f"{100 * r['fraction_stored_changed']:.1f}% changed")


if __name__ == "__main__":
    main()
