"""The training loop: budget, sampler → method.step, metrics, dev evaluation, best-dev state, final test.

Knows methods only through ``step`` / ``state_dict``. The best-dev state is the FO/PEFT weights at that
evaluation plus an index into the ZO log; the base model at that point is rebuilt exactly by replaying
the log from the original weights.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hyft.config import RunConfig
from hyft.errors import HyftError
from hyft.evaluate import evaluate
from hyft.methods import METHODS, Method, Objective
from hyft.models import load_model
from hyft.params import ParamGroups, prepare
from hyft.rundir import RunDir
from hyft.sampler import EpochSampler
from hyft.tasks import get_task, sample_splits
from hyft.zo import ZOEngine, ZOLog, ZOUpdate, canonical_name

MAX_BAD_STEPS = 5  # consecutive non-finite steps before a run is declared diverged


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HyftError("device cuda requested but CUDA is not available; use --device cpu")
    return torch.device(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class Snapshot:
    """The best-dev state: a copy of the directly trained weights and how many ZO updates were applied."""

    step: int
    dev_accuracy: float
    weights: list[torch.Tensor]
    zo_updates: int


class Trainer:
    """One run: ``Trainer(config, out).run()`` returns the results dict also written to results.json."""

    def __init__(self, config: RunConfig, out: str | Path, overwrite: bool = False, progress: bool = True):
        self.config = config.validate()
        self.run_dir = RunDir.create(out, overwrite)
        self.progress = progress
        config.to_yaml(self.run_dir.config)

    def log(self, message: str) -> None:
        print(message, file=sys.stderr)

    def run(self) -> dict[str, Any]:
        c = self.config
        device = resolve_device(c.device)
        torch.manual_seed(c.seed)
        splits = sample_splits(get_task(c.task), c.seed, c.num_train, c.num_dev, c.num_test)
        for note in splits.notes:
            self.log(f"note: {note}")
        dev = splits.dev[: c.eval_dev_examples]
        model, tokenizer = load_model(c.model, c.dtype, device)

        zero_shot = None
        if c.zero_shot:
            zero_shot = evaluate(model, tokenizer, splits.test, c.eval_batch_size, c.normalize, c.max_length,
                                 self.progress, "zero-shot test").accuracy
            self.log(f"zero-shot test accuracy: {zero_shot:.4f} (n={len(splits.test)})")

        model, groups = prepare(model, c)
        self.log(f"{c.method}: {groups.describe()}")
        total = c.steps if c.epochs is None else math.ceil(c.epochs * len(splits.train) / c.batch_size)
        method: Method = METHODS[c.method](model, groups, Objective(model, tokenizer, c), c, total)
        sampler = EpochSampler(len(splits.train), c.batch_size, c.shuffle, c.seed)
        zo_log = ZOLog(self.run_dir.zo_log)
        if method.engine is not None:
            zo_log.start(zo_header(c, method.engine))
        snapshot_params = groups.fo + (groups.zo if c.method == "zo-peft" else [])
        zo_on_base = c.method in ("hybrid", "zo-full")

        def dev_eval(step: int) -> float:
            result = evaluate(model, tokenizer, dev, c.eval_batch_size, c.normalize, c.max_length, False)
            self.run_dir.log_metrics({"step": step, "dev_accuracy": result.accuracy, "eval_seconds": result.seconds})
            return result.accuracy

        best: Snapshot | None = None
        n_updates, bad, skipped_total, train_seconds = 0, 0, 0, 0.0
        bar = tqdm(range(total), desc=f"{c.method} {c.task}", disable=not self.progress, dynamic_ncols=True)
        dev_acc = float("nan")
        for step in bar:
            start = time.perf_counter()
            examples = [splits.train[i] for i in sampler.next_batch()]
            stats = method.step(examples, step)
            seconds = time.perf_counter() - start
            train_seconds += seconds
            if stats.zo_update is not None:
                zo_log.append(stats.zo_update)
                n_updates += 1
            bad = bad + 1 if stats.skipped else 0
            skipped_total += int(stats.skipped)
            self.run_dir.log_metrics({
                "step": step + 1, "epoch": sampler.epoch, "loss": stats.loss, "lr_zo": stats.lr_zo,
                "lr_fo": stats.lr_fo, "zo_coef": stats.zo_coef, "seconds": round(seconds, 4),
                "skipped": stats.skipped,
            })
            if bad >= MAX_BAD_STEPS:
                raise HyftError(
                    f"training diverged: {bad} consecutive non-finite losses or ZO coefficients at step {step + 1} "
                    f"(no update was applied for them); lower lr_fo/lr_zo or eps. Metrics so far: "
                    f"{self.run_dir.metrics}"
                )
            is_last = step + 1 == total
            if (c.eval_every and (step + 1) % c.eval_every == 0) or is_last:
                dev_acc = dev_eval(step + 1)
                if best is None or dev_acc > best.dev_accuracy:
                    weights = [p.detach().to("cpu", copy=True) for _, p in snapshot_params]
                    best = Snapshot(step + 1, dev_acc, weights, n_updates)
            bar.set_postfix(loss=f"{stats.loss:.4f}", dev=f"{dev_acc:.3f}", refresh=False)
        bar.close()
        steps_per_second = total / train_seconds if train_seconds else float("nan")

        assert best is not None
        self.restore(best, snapshot_params, groups, zo_on_base, method, model)
        self.model, self.tokenizer = model, tokenizer  # the best-dev state, for callers of the library
        test = evaluate(model, tokenizer, splits.test, c.eval_batch_size, c.normalize, c.max_length,
                        self.progress, "test")
        if c.uses_peft:
            model.save_pretrained(self.run_dir.adapter)
        results = {
            "method": c.method, "task": c.task, "model": c.model, "steps": total, "seed": c.seed,
            "batch_size": c.batch_size, "lr_fo": c.lr_fo if groups.fo else None,
            "lr_zo": c.lr_zo if groups.zo else None, "eps": c.eps if groups.zo else None,
            "estimator": c.estimator if groups.zo else None,
            "test_accuracy": test.accuracy, "n_test": test.n, "best_dev_accuracy": best.dev_accuracy,
            "best_step": best.step, "zero_shot_test_accuracy": zero_shot,
            "zo_log_best_index": best.zo_updates if groups.zo else None,
            "train_seconds": round(train_seconds, 2), "steps_per_second": round(steps_per_second, 4),
            "skipped_steps": skipped_total, "peak_rss_mb": round(peak_memory_mb(torch.device("cpu")), 1),
            "peak_device_mb": round(peak_memory_mb(device), 1) if device.type == "cuda" else None,
            "device": str(device), "num_train": len(splits.train), "n_dev_eval": len(dev),
            "trainable_fo": sum(p.numel() for _, p in groups.fo), "trainable_zo": sum(p.numel() for _, p in groups.zo),
        }
        self.run_dir.write_results(results)
        from hyft.plot import plot_run

        plot_run(self.run_dir.path)
        self.log(f"test accuracy: {test.accuracy:.4f} (best dev {best.dev_accuracy:.4f} at step {best.step}); "
                 f"results in {self.run_dir.results}")
        return results

    def restore(self, best: Snapshot, snapshot_params, groups: ParamGroups, zo_on_base: bool,
                method: Method, model: torch.nn.Module) -> None:
        """Put the model back in its best-dev state (a no-op when the best evaluation was the last)."""
        with torch.no_grad():
            for (_, p), w in zip(snapshot_params, best.weights, strict=True):
                p.copy_(w)
        if not zo_on_base or method.engine is None:
            return
        _, updates = ZOLog.read(self.run_dir.zo_log)
        if best.zo_updates == len(updates):
            return
        self.log(f"rebuilding the base model at step {best.step} from the ZO log ({best.zo_updates} updates)")
        original, _ = load_model(self.config.model, self.config.dtype, next(model.parameters()).device)
        replay_into(method.engine, original, updates[: best.zo_updates])


def zo_header(config: RunConfig, engine: ZOEngine) -> dict[str, Any]:
    names = [canonical_name(n) for n, _ in engine.params]
    return {
        "model": config.model, "method": config.method, "dtype": config.dtype, "dist": engine.dist,
        "zo_params": config.zo_params, "num_tensors": len(names), "numel": engine.numel,
        "first": names[:1], "last": names[-1:],
    }


@torch.no_grad()
def replay_into(engine: ZOEngine, original: torch.nn.Module, updates: list[ZOUpdate]) -> None:
    """Reset the engine's parameters to ``original``'s weights, then apply ``updates`` in order."""
    source = {canonical_name(n): p for n, p in original.named_parameters()}
    for name, p in engine.params:
        p.copy_(source[canonical_name(name)])
    for u in updates:
        engine.update(u)


def train(config: RunConfig, out: str | Path, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Library entry point: run one training job and return its results."""
    return Trainer(config, out, overwrite, progress).run()
