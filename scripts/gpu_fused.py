"""The fused device kernels on a lent GPU: does the self-check keep them, do they give the torch ops' bits on a
whole model, and how long do a ZO update sweep and a perturbed forward take with and without them?

On a random Llama in bf16 (TinyLlama's 1.17 B shape, as ``gpu_check.py bench``), with the default engine
(residual, nearest rounding) and with stochastic rounding, for Gaussian and Rademacher z: one perturbed
forward's loss and one update's weights and residuals by the torch ops and by the default dispatch (each
variant checked on first use; a refused one warns, and the warnings are recorded), bitwise compared; then the
median seconds of ``--repeats`` update sweeps and perturbed forwards by each (synchronised at both ends only)
and the fused launches of one update.
Writes ``OUT/gpu_fused.json`` and prints it.

    python scripts/gpu_fused.py --device cuda --out $OUT            # on the GPU (scripts/gpu_run.sh)
    TRITON_INTERPRET=1 python scripts/gpu_fused.py --device cpu --size tiny --force --out runs/fused  # here
"""

from __future__ import annotations

import argparse
import json
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hyft.engine import device_kernel
from hyft.engine.zo import ZOEngine, ZOUpdate, select_params
from hyft.tools.bench.sweeps import median_seconds

SHAPES = {"1b": dict(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4),
          "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--force", action="store_true", help="use the kernels unchecked (the CPU interpreter)")
    parser.add_argument("--out", default="runs/gpu-fused")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    summary: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "torch": torch.__version__}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **SHAPES[args.size]))
    model = model.to(device=device, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (8, 128), device=device)
    params = select_params(model)
    original = [p.detach().clone() for _, p in params]
    rows = []
    for dist in ("gaussian", "rademacher"):
        for rounding in ("nearest", "stochastic"):
            row: dict = {"dist": dist, "rounding": rounding}
            results = []
            for key in ("torch_ops", "fused"):
                with torch.no_grad():
                    for (_, p), p0 in zip(params, original, strict=True):
                        p.copy_(p0)
                engine = ZOEngine(model, params, dist=dist, eps=1e-3, compensate=rounding == "nearest",
                                  rounding=rounding)
                if key == "torch_ops":
                    path = device_kernel.disabled()
                else:  # as a run would: each variant checked on first use (or forced, --force)
                    path = device_kernel.forced(device_kernel.Kernels()) if args.force else nullcontext()
                with path, torch.no_grad(), warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", RuntimeWarning)
                    with engine.perturbed(11, 1e-3):
                        loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
                    engine.update(ZOUpdate(step=0, seed=11, coef=0.5, lr=1e-4))
                    results.append((loss, [p.detach().clone() for _, p in params],
                                    [r.clone() for r in engine.residuals if r is not None]))

                    def update(engine=engine) -> None:
                        engine.update(ZOUpdate(step=1, seed=12, coef=0.5, lr=1e-4))

                    def forward(engine=engine) -> None:
                        with engine.perturbed(13, 1e-3):
                            model(input_ids=ids)

                    row[f"update_s_{key}"] = median_seconds(update, sync, args.repeats)
                    row[f"perturbed_forward_s_{key}"] = median_seconds(forward, sync, args.repeats)
                    before = device_kernel.Launches.count
                    update()
                    row[f"fused_launches_per_update_{key}"] = device_kernel.Launches.count - before
                row[f"warnings_{key}"] = [str(w.message)[:300] for w in caught]
            (loss_a, ps_a, rs_a), (loss_b, ps_b, rs_b) = results
            row["same_loss_bits"] = bool(torch.equal(loss_a, loss_b))
            row["same_weight_bits"] = all(torch.equal(a.view(torch.int16), b.view(torch.int16))
                                          for a, b in zip(ps_a, ps_b, strict=True))
            row["same_residual_bits"] = all(torch.equal(a.view(torch.int16), b.view(torch.int16))
                                            for a, b in zip(rs_a, rs_b, strict=True))
            rows.append(row)
            print(json.dumps(row), flush=True)
    with torch.no_grad():
        summary["plain_forward_s"] = median_seconds(lambda: model(input_ids=ids), sync, args.repeats)
    summary["rows"] = rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_fused.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
