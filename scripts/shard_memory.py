"""Per-device memory on paper (issue #29, BENCHMARKS.md): zo-full, hybrid and fo-peft for Llama-shaped 7 B, 70 B
and 405 B models on D devices, unsharded (every device holds the model: plain data parallel) against FSDP2-sharded
as ``--shard fsdp`` does it. All counts are per device, in GiB; every device runs a batch of B × T tokens.

    python scripts/shard_memory.py            # prints the markdown table of BENCHMARKS.md

Terms (b = 2 bytes, bf16 weights; P parameters, L layers, h hidden, f MLP width, V vocabulary):
- weights: P·b unsharded; P·b/D sharded, plus FSDP2's gathered units: max(2 blocks (current + prefetched),
  the root's embeddings and head) · b.
- ZO in bf16 (zo-full, hybrid's θ): hyft's residual (Kahan) buffer, P·b (sharded P·b/D); sharded, the engine also
  saves the local rows while they are perturbed, P·b/D. Unsharded, perturbed temporaries are ≤ 64 Mi elements
  (DEVICE_LOOKAHEAD), 0.125 GiB. Stochastic rounding (--zo-rounding stochastic) drops the residual.
- LoRA r on every linear layer of every block: r·Σ(d_in + d_out) parameters, 16 bytes each with AdamW (fp32
  value, gradient, two moments); sharded /D.
- activations, training (fo-peft, hybrid's backward): 34·B·T·h bytes per layer (Korthikanti et al. 2022, 16-bit,
  flash attention, no recomputation) + fp32 logits and their gradient, 8·B·T·V. Inference (zo-full's forwards):
  one layer's working set, (4h + 3f)·B·T·b, + fp32 logits 4·B·T·V. Activations are never sharded by FSDP.
"""

from __future__ import annotations

import argparse

GIB = 2**30
MODELS = {  # Llama-2-7B, Llama-3-70B, Llama-3.1-405B shapes (untied)
    "7B": dict(L=32, h=4096, f=11008, V=32000, kv=4096),
    "70B": dict(L=80, h=8192, f=28672, V=128256, kv=1024),
    "405B": dict(L=126, h=16384, f=53248, V=128256, kv=1024),
}


def counts(m: dict[str, int]) -> dict[str, int]:
    h, f, kv = m["h"], m["f"], m["kv"]
    block = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h  # q, o; k, v; gate, up, down; two norms
    root = 2 * m["V"] * h + h
    lora_in_out = (h + h) * 2 + (h + kv) * 2 + (h + f) * 2 + (f + h)
    return {"P": m["L"] * block + root, "block": block, "root": root, "lora_per_rank": m["L"] * lora_in_out}


def table(devices: int, batch: int, tokens: int, rank: int, b: int = 2) -> str:
    rows = [f"| model | P | method | unsharded (GiB) | FSDP2, {devices} devices (GiB) | of which weights, sharded | "
            "ZO buffers, sharded | LoRA + AdamW, sharded | activations |", "|---" * 9 + "|"]
    for name, m in MODELS.items():
        c = counts(m)
        P, D, BT = c["P"], devices, batch * tokens
        gathered = max(2 * c["block"], c["root"]) * b
        lora = c["lora_per_rank"] * rank * 16
        act_train = 34 * BT * m["h"] * m["L"] + 8 * BT * m["V"]
        act_infer = (4 * m["h"] + 3 * m["f"]) * BT * b + 4 * BT * m["V"]
        for method in ("zo-full", "hybrid", "fo-peft"):
            zo = method != "fo-peft"
            trains = method != "zo-full"
            act = act_train if trains else act_infer
            un = P * b + (P * b + 0.125 * GIB if zo else 0) + (lora if trains else 0) + act
            w_sh = P * b / D + gathered
            zo_sh = 2 * P * b / D if zo else 0
            lora_sh = lora / D if trains else 0
            sh = w_sh + zo_sh + lora_sh + act
            rows.append(f"| {name} | {P / 1e9:.1f} B | {method} | {un / GIB:,.1f} | {sh / GIB:,.1f} | "
                        f"{w_sh / GIB:,.1f} | {zo_sh / GIB:,.1f} | {lora_sh / GIB:,.2f} | {act / GIB:,.1f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--lora-r", type=int, default=16)
    args = parser.parse_args()
    print(table(args.devices, args.batch, args.tokens, args.lora_r))


if __name__ == "__main__":
    main()
