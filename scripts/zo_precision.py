"""Is an SPSA difference still signal when forwards run in lower precision? On the same batches and the same
seeded directions, the ZO coefficient g = (L(θ+εz) − L(θ−εz)) / 2ε with float32 forwards, with bfloat16
autocast over float32 weights (``--autocast bfloat16``) and with bfloat16 weights (``--dtype bfloat16``), and
the FO gradient of a LoRA adapter with float32 forwards and under autocast. Prints each case's agreement with
float32 (correlation of g over every batch × direction, and RMS(g − g_fp32) / RMS(g_fp32)) and its forward
time, and writes JSON.

    python scripts/zo_precision.py --task sst2 --out runs/zo_precision/sst2.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from hyft.config import RunConfig
from hyft.methods import Objective
from hyft.methods.params import prepare
from hyft.models import load_model
from hyft.tasks import get_task, sample_splits

CASES = {"float32": ("float32", "none"), "autocast-bfloat16": ("float32", "bfloat16"),
         "bfloat16-weights": ("bfloat16", "none")}


def coefficients(case: str, args: argparse.Namespace, batches: list) -> tuple[list[float], list[float]]:
    """g for every (batch, direction), in that order, and the seconds of each forward."""
    dtype, precision = CASES[case]
    config = RunConfig(method="zo-full", task=args.task, dtype=dtype, autocast=precision, zo_dist="gaussian",
                       eps=args.eps, batch_size=args.batch_size, max_length=args.max_length).validate()
    model, tokenizer = load_model("smollm2-135m", dtype)
    model, groups = prepare(model, config)
    method = config.spec.rule(model, groups, Objective(model, tokenizer, config), config, total=1)
    gs, seconds = [], []
    for examples in batches:
        batch = method.objective.encode(examples)
        for d in range(args.directions):
            t = time.perf_counter()
            plus, minus = method.loss_pair(batch, seed=1000 + d, eps=args.eps)
            seconds.append((time.perf_counter() - t) / 2)
            gs.append((plus - minus) / (2 * args.eps))
    return gs, seconds


def lora_gradients(precision: str, args: argparse.Namespace, batches: list) -> list[torch.Tensor]:
    """The LoRA adapter's gradient on each batch (float32 weights, forwards as ``precision``)."""
    config = RunConfig(method="fo-peft", task=args.task, autocast=precision, batch_size=args.batch_size,
                       max_length=args.max_length, seed=0).validate()
    torch.manual_seed(0)  # the same adapter initialisation in both cases
    model, tokenizer = load_model("smollm2-135m", "float32")
    model, groups = prepare(model, config)
    objective = Objective(model, tokenizer, config)
    grads = []
    for examples in batches:
        model.zero_grad(set_to_none=True)
        objective(objective.encode(examples)).backward()
        grads.append(torch.cat([p.grad.flatten() for _, p in groups.fo]))
    return grads


def agreement(g: list[float], ref: list[float]) -> dict[str, float]:
    a, b = torch.tensor(g, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    return {"correlation": float(torch.corrcoef(torch.stack([a, b]))[0, 1]),
            "relative_rms_error": float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()),
            "sign_agreement": float(((a > 0) == (b > 0)).double().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--directions", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--out", default="runs/zo_precision.json")
    args = parser.parse_args()
    train = sample_splits(get_task(args.task), 0, args.batches * args.batch_size, 0, 1).train
    batches = [train[i * args.batch_size:(i + 1) * args.batch_size] for i in range(args.batches)]
    result: dict = {"setup": {**vars(args), "host": platform.processor() or platform.machine(),
                              "threads": torch.get_num_threads(), "torch": torch.__version__}}
    ref: list[float] = []
    for case in CASES:
        gs, seconds = coefficients(case, args, batches)
        ref = ref or gs
        result[case] = {"g": gs, "forward_seconds_median": statistics.median(seconds), **agreement(gs, ref)}
        print(f"{case:18} corr {result[case]['correlation']:.4f}  rel. RMS error "
              f"{result[case]['relative_rms_error']:.4f}  signs {result[case]['sign_agreement']:.3f}  "
              f"forward {result[case]['forward_seconds_median']:.2f} s", flush=True)
    full, mixed = lora_gradients("none", args, batches), lora_gradients("bfloat16", args, batches)
    cosines = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in zip(full, mixed, strict=True)]
    norms = [float(b.norm() / a.norm()) for a, b in zip(full, mixed, strict=True)]
    result["lora_gradient_autocast"] = {"cosine_to_fp32": cosines, "norm_ratio_to_fp32": norms}
    print(f"LoRA gradient under autocast: cosine to fp32 {', '.join(f'{c:.4f}' for c in cosines)}; "
          f"norm ratio {', '.join(f'{n:.4f}' for n in norms)}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
