"""The device checks for a task that is lent an accelerator (first run on an H200, 2026-12-04: BENCHMARKS.md).

Here, on the CPU machine, ``prepare`` writes what travels: a tiny random Llama (the tests' tokenizer), a
short CPU run of it for each direction family with its ZO log and the CPU-replayed weights, and the
wheel of ``gguf`` (not in the GPU image):

    PYTHONPATH=. python scripts/gpu_check.py prepare --out runs/gpu-check        # ~20 s; under 1 MB
    echo /.whl/ >> .git/info/exclude && python3 -m pip download --no-deps --only-binary=:all: \\
        --python-version 3.12 --implementation cp -d .whl gguf  # once

Then one device call (carry: runs/gpu-check, .whl), within about 10 minutes: ``bash scripts/gpu_run.sh``,
which also runs tests/test_device.py there. The wheels are this project's transformers/peft/gguf stack
(transformers, peft, gguf, tokenizers, huggingface_hub and its needs, kernels), as `pip list` shows them here.

``check`` (also runnable here with ``--device cpu``, which is how it is tested) does, in order:
1. the CPU logs replayed on the device: Rademacher directions bitwise equal to the CPU replay, Gaussian
   within 1e-6 relative (log/cos may differ in the last bit across device kinds), low-rank within 1e-5
   (its U Vᵀ is a matrix product, summed in another order);
2. a short hybrid run on the device of the same tiny model, replayed on the device: bitwise;
3. ``hyft bench`` rows on a random 1.1 B Llama in bf16 (TinyLlama's shape), with ``--launches``.
Its summary goes to ``OUT/gpu_check.json``; the bench's to ``OUT/bench``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

DISTS = ("rademacher", "gaussian", "lowrank")
# stated before any device run: Rademacher signs are written as bits, so bitwise; a Gaussian draw goes through
# log/cos, whose last bit may differ between device kinds; low-rank folds U Vᵀ by a matrix product, whose
# summation order differs between CPU and CUDA kernels (TF32 stays off, torch's default for fp32 matmul)
TOLERANCE = {"rademacher": 0.0, "gaussian": 1e-6, "lowrank": 1e-5}
BENCH_ROWS = ("forward", "fo-peft", "fo-full", "mezo", "zo-full-in-place", "hybrid-two-sided", "zo-lowrank",
              "hybrid-lowrank")
LOWRANK = ("--zo-rank", "2", "--zo-lazy", "3")  # V held 3 steps: 6 steps fold twice


def hyft(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "hyft", *args], check=True)


def prepare(out: Path) -> None:
    """The tiny model, one CPU run per direction family, and each run's CPU-replayed weights."""
    from tests.conftest import make_tokenizer, tiny_model

    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "tiny-llama"
    tok = make_tokenizer()
    tiny_model("llama", len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    for dist in DISTS:
        run = out / f"cpu-{dist}"
        extra = LOWRANK if dist == "lowrank" else ()
        hyft("train", "--model", str(model_dir), "--method", "zo-full", "--zo-dist", dist, *extra, "--task", "sst2",
             "--steps", "6", "--batch-size", "4", "--num-train", "24", "--num-dev", "8", "--num-test", "8",
             "--eval-every", "6", "--lr-zo", "1e-3", "--eps", "1e-2", "--no-zero-shot", "--no-progress",
             "--device", "cpu", "--out", str(run), "--overwrite")
        replayed(model_dir, run / "zo_log.jsonl", "cpu", out / f"cpu-{dist}-replayed.safetensors")


def replayed(model_dir: Path, log: Path, device: str, path: Path) -> dict[str, torch.Tensor]:
    from hyft.tools.replay import replay

    model = replay(str(model_dir), log, device=device, log=lambda *_: None)
    weights = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters()}
    save_file(weights, str(path))
    return weights


def gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[bool, float]:
    """Bitwise equal?, and the largest relative difference."""
    equal = all(torch.equal(a[n], b[n]) for n in a)
    rel = max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-30)).item() for n in a)
    return equal, rel


def check(src: Path, device: str, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    model_dir = src / "tiny-llama"
    summary: dict = {"device": device, "torch": torch.__version__,
                     "name": torch.cuda.get_device_name() if device == "cuda" else "cpu", "replay_cpu_log": {}}
    for dist in DISTS:  # 1. the CPU logs on this device
        cpu = load_file(str(src / f"cpu-{dist}-replayed.safetensors"))
        here = replayed(model_dir, src / f"cpu-{dist}" / "zo_log.jsonl", device, out / f"{dist}.safetensors")
        equal, rel = gap(here, cpu)
        summary["replay_cpu_log"][dist] = {"bitwise": equal, "max_rel": rel,
                                           "tolerance": TOLERANCE[dist],
                                           "ok": equal if TOLERANCE[dist] == 0 else rel <= TOLERANCE[dist]}
    run = out / "device-hybrid"  # 2. a run on this device, replayed on it
    start = time.perf_counter()
    hyft("train", "--model", str(model_dir), "--method", "hybrid", "--task", "sst2", "--steps", "6",
         "--batch-size", "4", "--num-train", "24", "--num-dev", "8", "--num-test", "8", "--eval-every", "6",
         "--lr-zo", "1e-3", "--eps", "1e-2", "--no-zero-shot", "--no-progress", "--device", device,
         "--out", str(run), "--overwrite")
    # the base is what the log rebuilds: two replays on this device must agree bitwise
    a = replayed(model_dir, run / "zo_log.jsonl", device, out / "device-replay-a.safetensors")
    b = replayed(model_dir, run / "zo_log.jsonl", device, out / "device-replay-b.safetensors")
    summary["device_run"] = {"seconds": round(time.perf_counter() - start, 1), "replay_deterministic": gap(a, b)[0],
                             "results": json.loads((run / "results.json").read_text())["test_accuracy"]}
    summary["ok"] = all(r["ok"] for r in summary["replay_cpu_log"].values()) and \
        summary["device_run"]["replay_deterministic"]
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


def bench(out: Path, device: str, size: str, rows: tuple[str, ...] = BENCH_ROWS, *extra: str) -> None:
    """3. bench rows on a random Llama (bf16) with the tiny model's tokenizer; the launches of a 7B step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes = {"1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4),
              "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2)}
    model_dir = out / f"llama-{size}-random-bf16"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, tie_word_embeddings=False, **shapes[size])).to(
        torch.bfloat16).save_pretrained(model_dir)
    from tests.conftest import make_tokenizer

    make_tokenizer().save_pretrained(model_dir)
    hyft("bench", "--model", str(model_dir), "--device", device, "--dtype", "bfloat16", "--batch-size", "8",
         "--seq-len", "128", "--rows", *rows, "--repeats", "3", "--warmup", "1", *(extra or ("--launches",)),
         "--out", str(out / "bench"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", default="runs/gpu-check")
    p = sub.add_parser("check")
    p.add_argument("--in", dest="src", default="runs/gpu-check")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="runs/gpu-check-out")
    p.add_argument("--bench-size", default="1b", choices=["1b", "tiny", "none"])
    p = sub.add_parser("bench")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="runs/gpu-check-out")
    p.add_argument("--size", default="1b", choices=["1b", "tiny"])
    p.add_argument("--rows", nargs="+", default=list(BENCH_ROWS))
    p.add_argument("--sweeps", action="store_true", help="time one RNG sweep instead of counting launches")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(Path(args.out))
        return
    if args.command == "bench":
        bench(Path(args.out), args.device, args.size, tuple(args.rows), *(["--sweeps"] if args.sweeps else []))
        return
    summary = check(Path(args.src), args.device, Path(args.out))
    if args.bench_size != "none":
        bench(Path(args.out), args.device, args.bench_size)
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
