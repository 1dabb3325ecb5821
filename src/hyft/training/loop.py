"""The training loop: budget, sampler → method.step, metrics, dev evaluation, best-dev state, checkpoints,
final test.

Knows methods only through ``step`` / ``state_dict``. The base model is never copied in memory: its state
at any step is the nearest base snapshot (written every ``snapshot_every`` ZO updates) plus at most that
many updates of the ZO log, so the best-dev state and every checkpoint hold only the directly trained
weights (PEFT module, or all weights for fo-full; one copy each, the best-dev one in its own file) and an
index into that log. A run killed at any point and resumed with ``--resume`` ends bitwise where the
uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from hyft.config import RunConfig
from hyft.distributed import Communicator, PeerLost, connect, rank_device
from hyft.engine import masks, shards
from hyft.engine.factory import Engine
from hyft.engine.zo import ZOLog, ZOUpdate, canonical_name
from hyft.errors import HyftError
from hyft.memory import peak_memory_mb, reset_peak_rss
from hyft.methods import Method, Objective, StepStats
from hyft.methods.params import ParamGroups, prepare, split_groups
from hyft.models import load_model, model_dir, resolve_dtype
from hyft.rundir import RunDir
from hyft.seeds import derive_seed
from hyft.tasks import Splits, get_task, sample_splits
from hyft.tasks.evaluate import METRICS, EvalResult, evaluate_task
from hyft.tasks.scoring import completion_ids, context_ids
from hyft.training import checkpoint, sharding
from hyft.training.reporting import Reporter, reporter
from hyft.training.sampler import EpochSampler
from hyft.training.snapshots import BaseSnapshots, Lookup, check_device, original_lookup, rebuild


class Interrupted(HyftError):
    """SIGINT/SIGTERM arrived: a checkpoint was saved and the run can be resumed."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HyftError("device cuda requested but CUDA is not available; use --device cpu")
    return torch.device(device)


@dataclass
class Snapshot:
    """The best-dev state: the file of the directly trained weights and how many ZO updates had been applied."""

    step: int
    dev_accuracy: float
    weights: str  # file name in the run directory (safetensors)
    zo_updates: int


@dataclass
class TrainState:
    """Counters of the loop; with the method's, sampler's and RNG states it is a checkpoint."""

    step: int = 0  # completed steps
    zo_updates: int = 0  # lines in the ZO log after its header
    metrics_lines: int = 0
    bad: int = 0  # consecutive skipped (non-finite) steps
    skipped: int = 0
    train_seconds: float = 0.0
    dev_accuracy: float = float("nan")
    zero_shot: float | None = None
    best: Snapshot | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """What a run is made of once set up: data, model, groups, the method, the order, the log, the state."""

    model: nn.Module
    tokenizer: Any
    splits: Splits
    dev: list
    groups: ParamGroups
    method: Method
    sampler: EpochSampler
    zo_log: ZOLog
    direct: list[tuple[str, nn.Parameter]]
    total: int
    state: TrainState
    sent_before: Counter = field(default_factory=Counter)
    steps_before: int = 0


class Trainer:
    """One run: ``Trainer(config, out).run()`` returns the results dict also written to results.json."""

    def __init__(self, config: RunConfig, out: str | Path, overwrite: bool = False, progress: bool = True,
                 resume: bool = False):
        self.config = config.validate()
        self.task = get_task(config.task)
        self.device = rank_device(resolve_device(config.device))
        self.sharded = config.shard == "fsdp"
        # data parallel under torchrun (FSDP2-sharded with --shard fsdp), else one process
        self.comm: Communicator = connect(self.device, sharded=self.sharded)
        # sharded: every rank evaluates the whole split (FSDP2's gathers need every rank in every forward)
        self.eval_comm: Communicator = Communicator() if self.sharded else self.comm
        self.comm.shard(range(config.batch_size))  # a global batch that does not split evenly fails here
        self.progress = progress and self.comm.is_main
        self.resume = resume

        def open_run_dir() -> None:
            if resume:
                run_dir = RunDir.existing(out)
                changes = config_changes(RunConfig.from_yaml(run_dir.config).to_dict(), config)
                if changes:
                    raise HyftError(f"cannot resume {out} with a different config ({changes}); "
                                    "start a new run with --out instead")
            else:
                config.to_yaml(RunDir.create(out, overwrite).config)

        self.on_main(open_run_dir)
        self.run_dir = RunDir(Path(out))
        self._stop: int | None = None
        self.reporter: Reporter = Reporter()
        self.snapshots = BaseSnapshots(self.run_dir.snapshots)

    def log(self, message: str) -> None:
        if self.comm.is_main:
            print(message, file=sys.stderr)

    def on_main(self, work: Callable[[], None]) -> None:
        """Run ``work`` (which writes the run directory) on rank 0 only; every rank raises its error, if any,
        and continues only after it is done."""
        error = None
        if self.comm.is_main:
            try:
                work()
            except HyftError as err:
                error = str(err)
        error = self.comm.broadcast_object(error)
        if error is not None:
            raise HyftError(error)

    # --- the run ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Set up, train to the budget (stopping cleanly on a signal), then test the best-dev state."""
        run = self._setup()
        # the peak of training alone (set-up's is separate): sharded ranks load the whole model before sharding
        self._setup_peak = reset_peak_rss()
        self._train(run)
        self._record_communication(run)
        results = self._finish(run)
        self.comm.close()
        return results

    # --- set-up ----------------------------------------------------------------------------------
    def _setup(self) -> Run:
        """Data, model (zero-shot tested on a fresh run), the method, and the state: resumed or step 0."""
        c, comm = self.config, self.comm
        torch.manual_seed(c.seed)  # the same on every rank: whatever the global RNG initialises is identical
        splits = self._splits()
        # sharded: the whole model stays in host memory; fully_shard moves each rank's rows to the device
        model, tokenizer = load_model(c.model, c.dtype, "cpu" if self.sharded else self.device)
        if self.task.kind != "choice":
            self._note_truncation(tokenizer, splits.train)
        ckpt = self._read_checkpoint() if self.resume else None
        state = TrainState()
        if ckpt is None and c.zero_shot and not self.sharded:
            self._zero_shot(model, tokenizer, splits.test, state, comm)
        model, groups = prepare(model, c)
        # the sparse-ZO mask is chosen on the whole model (sharded: before sharding) and read back by name
        choose_mask = bool(c.zo_mask and groups.zo)
        mask_path = self._zo_mask(model, tokenizer, groups, splits.train) if choose_mask and self.sharded else None
        if self.sharded:  # FSDP2 replaces every weight by a DTensor: the groups are taken again
            model = sharding.shard(model, comm, self.device)
            groups = split_groups(model, c.spec, c.zo_params)
            if ckpt is None and c.zero_shot:  # on the device, sharded, with the fresh adapter switched off
                with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
                    self._zero_shot(model, tokenizer, splits.test, state, self.eval_comm)
        self.log(f"{c.method}: {groups.describe()}")
        total = c.steps if c.epochs is None else math.ceil(c.epochs * len(splits.train) / c.batch_size)
        objective = Objective(model, tokenizer, c, comm)
        if c.auto_lr and ckpt is None:
            self.on_main(lambda: self._auto_lr(model, groups, objective, splits.train))
            for key, value in comm.broadcast_object(c.to_dict()).items():  # rank 0's suggestions
                setattr(c, key, value)
        if choose_mask and mask_path is None:  # unsharded: after the rate probe, as before (its RNG draws come first)
            mask_path = self._zo_mask(model, tokenizer, groups, splits.train)
        mask = masks.load(mask_path, groups.zo) if mask_path else None
        method: Method = c.spec.rule(model, groups, objective, c, total, mask, comm=comm)
        run = Run(model, tokenizer, splits, splits.dev[: c.eval_dev_examples], groups, method,
                  EpochSampler(len(splits.train), c.batch_size, c.shuffle, c.seed), ZOLog(self.run_dir.zo_log),
                  direct_params(c, groups), total, state)
        self._start_or_resume(run, ckpt)
        return run

    def _zero_shot(self, model: nn.Module, tokenizer, test: list, state: TrainState, comm: Communicator) -> None:
        c = self.config
        zero = evaluate_task(model, tokenizer, self.task, test, c.eval_batch_size, c.normalize, c.max_length,
                             self.progress, "zero-shot test", comm, precision=c.autocast)
        state.zero_shot = zero.accuracy  # the headline metric; every metric is in extra
        state.extra["zero_shot_metrics"] = zero.metrics
        self.log(f"zero-shot test {zero.describe()} (n={len(test)})")

    def _note_truncation(self, tokenizer, examples: list) -> None:
        """Say once how many training examples are longer than ``max_length`` (their prompts lose their first
        tokens: a SQuAD context's start, never the question or the answer) and how long they are."""
        lengths = [len(context_ids(tokenizer, ex.context))
                   + len(completion_ids(tokenizer, ex.context, ex.candidates[0])) for ex in examples]
        cut = sum(n > self.config.max_length for n in lengths)
        self.log(f"{self.config.task}: {statistics.mean(lengths):.0f} tokens per training example on average "
                 f"(max {max(lengths)}); {cut} of {len(lengths)} exceed --max-length {self.config.max_length} and "
                 "lose the start of their prompt (the completion, and the end of the prompt, are kept)")

    def _splits(self) -> Splits:
        """The task's train/dev/test examples (MeZO's sampling); the last batch of an epoch must shard evenly."""
        c, comm = self.config, self.comm
        splits = sample_splits(self.task, c.seed, c.num_train, c.num_dev, c.num_test)
        for note in splits.notes:
            self.log(f"note: {note}")
        last = len(splits.train) % c.batch_size  # the short last batch of every epoch must split evenly too
        if comm.world > 1 and last % comm.world:
            raise HyftError(f"the last batch of each epoch has {last} of the {len(splits.train)} training examples, "
                            f"which cannot be split over {comm.world} processes; use --num-train or --batch-size "
                            f"so that {comm.world} divides both the batch size and the remainder")
        return splits

    def _start_or_resume(self, run: Run, ckpt: dict[str, Any] | None) -> None:
        """A fresh run starts the ZO log and writes the step-0 checkpoint; a resumed one restores its state."""
        c, comm = self.config, self.comm
        if comm.rank and ckpt is None:  # rank 0 keeps the one-process stream: own dropout masks per shard
            torch.manual_seed(derive_seed(c.seed, "dropout", comm.rank))
        if ckpt is not None:
            run.state = self._resume_from(ckpt, run.method, run.sampler, run.direct, run.model)
            self.log(f"resumed {self.run_dir.path} at step {run.state.step} of {run.total}")
        else:
            if run.method.engine is not None and comm.is_main:
                run.zo_log.start(c.zo_header(run.method.engine, self.device.type))
            self._save_checkpoint(run.state, run.method, run.sampler, run.direct)
        if self.sharded:
            self.log(f"FSDP2: {comm.world} process(es) ({comm.backend}) each hold 1/{comm.world} of every weight and "
                     f"take {c.batch_size // comm.world} examples of every batch of {c.batch_size}")
        else:
            comm.broadcast_([p for _, p in run.direct])  # replicas start equal, as DDP makes them
        if comm.world > 1 and not self.sharded:
            self.log(f"data parallel: {comm.world} processes ({comm.backend}), {c.batch_size // comm.world} "
                     f"examples each of every batch of {c.batch_size}")
        run.sent_before, run.steps_before = self.comm.sent.copy(), run.state.step

    # --- the loop --------------------------------------------------------------------------------
    def _train(self, run: Run) -> None:
        """step → record → (diverged?) → evaluate → checkpoint → stop on a signal, until the budget is spent."""
        c, state = self.config, run.state
        self.reporter = reporter(c.report_to if self.comm.is_main else "none", self.run_dir.path, c.to_dict())
        bar = tqdm(total=run.total, initial=state.step, desc=f"{c.method} {c.task}", disable=not self.progress,
                   dynamic_ncols=True)
        handlers = self._catch_signals()
        try:
            while state.step < run.total:
                with self.comm.around(f"step {state.step + 1}"):  # sharded: FSDP2's gathers in every forward
                    stats = self._step(run)
                self._check_divergence(state)
                if (c.eval_every and state.step % c.eval_every == 0) or state.step == run.total:
                    with self.comm.around("the dev evaluation"):
                        self._evaluate(run)
                checkpoint_due = (c.checkpoint_every and state.step % c.checkpoint_every == 0) \
                    or state.step == run.total
                if checkpoint_due and state.bad == 0:  # never checkpoint in a streak of skipped steps
                    self._save_checkpoint(state, run.method, run.sampler, run.direct)
                bar.update(1)
                bar.set_postfix(loss=f"{stats.loss:.4f}", dev=f"{state.dev_accuracy:.3f}",
                                steps_s=f"{state.step / max(state.train_seconds, 1e-9):.2f}", refresh=False)
                self._stop_if_signalled(run)
        except PeerLost as err:
            raise PeerLost(f"{err}. The last checkpoint in {self.run_dir.path} is intact: relaunch with "
                           f"`--resume {self.run_dir.path}`") from err
        finally:
            bar.close()
            self.reporter.close()
            self._restore_signals(handlers)

    def _step(self, run: Run) -> StepStats:
        """One step of the method on this rank's shard, its ZO updates logged and snapshotted, its row written."""
        c, comm, state = self.config, self.comm, run.state
        step, start = state.step, time.perf_counter()
        shard = comm.shard(run.sampler.next_batch())  # every rank walks the same order, takes its slice
        stats = run.method.step([run.splits.train[i] for i in shard], step)
        seconds = time.perf_counter() - start
        state.step, state.train_seconds = step + 1, state.train_seconds + seconds
        before = state.zo_updates
        for u in stats.zo_updates:
            if comm.is_main:
                run.zo_log.append(u)
            state.zo_updates += 1
        # a snapshot holds the base after whole steps (all directions of a step are applied at once)
        if c.zo_on_base and state.zo_updates // c.snapshot_every > before // c.snapshot_every \
                and (comm.is_main or self.sharded):  # sharded: every rank gathers, rank 0 writes
            assert run.method.engine is not None
            self.snapshots.write(run.method.engine, state.zo_updates, write=comm.is_main)
        state.bad = state.bad + 1 if stats.skipped else 0
        state.skipped += int(stats.skipped)
        self._log_metrics(state, {
            "step": step + 1, "epoch": run.sampler.epoch, "loss": stats.loss, "lr_zo": stats.lr_zo,
            "lr_fo": stats.lr_fo, "zo_coef": stats.zo_coef, "grad_norm": stats.grad_norm, "seconds": round(seconds, 4),
            "skipped": stats.skipped,
        })
        return stats

    def _check_divergence(self, state: TrainState) -> None:
        if state.bad >= self.config.max_bad_steps:
            raise HyftError(
                f"training diverged: {state.bad} consecutive non-finite losses or ZO coefficients at step "
                f"{state.step} (no update was applied for them); lower lr_fo/lr_zo or eps. The last good "
                f"checkpoint is kept in {self.run_dir.checkpoint}"
            )

    def _evaluate(self, run: Run) -> None:
        """Dev accuracy now; a new best keeps its direct weights (in a file) and its index into the ZO log."""
        c, state = self.config, run.state
        result = evaluate_task(run.model, run.tokenizer, self.task, run.dev, c.eval_batch_size, c.normalize,
                               c.max_length, False, comm=self.eval_comm, precision=c.autocast)
        self._log_metrics(state, {"step": state.step, **{f"dev_{k}": v for k, v in result.metrics.items()},
                                  "eval_seconds": round(result.seconds, 3)})
        state.dev_accuracy = result.score  # what best-dev selection maximises: accuracy, F1 or −loss
        if state.best is None or state.dev_accuracy > state.best.dev_accuracy:
            state.best = Snapshot(state.step, state.dev_accuracy, self._write_best(state.step, run.direct),
                                  state.zo_updates)

    def _stop_if_signalled(self, run: Run) -> None:
        stop = self.comm.max(self._stop or 0)  # every rank stops after the same step, naming the same signal
        if stop:
            self._save_checkpoint(run.state, run.method, run.sampler, run.direct)
            self.comm.barrier()  # no rank exits before the checkpoint is written
            raise Interrupted(f"{signal.Signals(stop).name} at step {run.state.step}: checkpoint saved; resume "
                              f"with `hyft train --resume {self.run_dir.path}`", stop)

    # --- the end ---------------------------------------------------------------------------------
    def _record_communication(self, run: Run) -> None:
        """What each step sent, by group, and (data parallel) a fingerprint of every replica's weights."""
        comm = self.comm
        done = max(run.state.step - run.steps_before, 1)
        record = {
            "world": comm.world, "backend": comm.backend,
            "bytes_per_step": {g: round((comm.sent[g] - run.sent_before[g]) / done, 1)
                               for g in ("zo", "fo", "control", *(("shard",) if self.sharded else ()))},
            # what the same step would send as one all-reduce of a gradient of every weight
            "full_gradient_bytes_per_step": sum(p.numel() * p.element_size() for p in run.model.parameters()),
        }
        if comm.world > 1 and not self.sharded:  # shards differ by design
            fingerprints = comm.fingerprints([p for p in run.model.parameters()])
            record["replica_fingerprints"] = fingerprints
            if len(set(fingerprints)) > 1:
                self.log(f"warning: the {comm.world} replicas hold different weights (fingerprints {fingerprints})")
        run.state.extra["communication"] = record

    def _finish(self, run: Run) -> dict[str, Any]:
        """Restore the best-dev state, test it, save the trained weights and write results.json (rank 0)."""
        c, state, comm, model = self.config, run.state, self.comm, run.model
        best = state.best
        assert best is not None
        comm.barrier()  # rank 0 has written the best-dev weights and the log the others read
        self.restore(best, run.direct, run.method, model)
        self.model, self.tokenizer = model, run.tokenizer  # the best-dev state, for callers of the library
        test = evaluate_task(model, run.tokenizer, self.task, run.splits.test, c.eval_batch_size, c.normalize,
                             c.max_length, self.progress, "test", self.eval_comm, precision=c.autocast)
        if run.method.engine is not None:
            run.method.engine.materialize()  # low-rank directions: the saved (and returned) weights are complete
        if comm.world > 1:  # every rank's peaks: sharding divides the weights, not the activations
            peaks = comm.all_gather_object(self._peaks())
            state.extra["peak_rss_mb_ranks"] = [p["peak_rss_mb"] for p in peaks]
            state.extra["train_peak_rss_mb_ranks"] = [p["train_peak_rss_mb"] for p in peaks]
            state.extra["setup_peak_rss_mb_ranks"] = [p["setup_peak_rss_mb"] for p in peaks]
        saving = c.uses_peft or c.spec.fo_on_base
        whole = None  # sharded: what save_pretrained writes, gathered (φ alone for a peft model)
        if self.sharded and c.uses_peft:
            whole = self._gathered(run.direct)
        elif self.sharded and saving:
            whole = sharding.full_state_dict(model)
        if not comm.is_main:
            comm.barrier()  # until rank 0 has written the results
            return self._results(state, run.total, run.groups, best, test, len(run.dev), self.device)
        if c.uses_peft:
            model.save_pretrained(self.run_dir.adapter, state_dict=whole)
        elif c.spec.fo_on_base:  # every weight was trained: keep the best-dev model itself
            model.save_pretrained(self.run_dir.model, state_dict=whole)
            run.tokenizer.save_pretrained(self.run_dir.model)
        results = self._results(state, run.total, run.groups, best, test, len(run.dev), self.device)  # peak RSS last
        self.run_dir.write_results(results)
        self.log(f"test {test.describe()} (best dev score {best.dev_accuracy:.4f} at step {best.step}); "
                 f"results in {self.run_dir.results}")
        comm.barrier()
        return results

    def _results(self, state: TrainState, total: int, groups: ParamGroups, best: Snapshot, test, n_dev: int,
                 device: torch.device) -> dict[str, Any]:
        c = self.config
        return {
            "method": c.method, "task": c.task, "model": c.model, "steps": total, "seed": c.seed,
            "batch_size": c.batch_size, "lr_fo": c.lr_fo if groups.fo else None,
            "lr_zo": c.lr_zo if groups.zo else None, "eps": c.eps if groups.zo else None,
            "estimator": c.estimator if groups.zo else None,
            **self._metric_results(state, test, best), "n_test": test.n, "best_step": best.step,
            "zo_log_best_index": best.zo_updates if groups.zo else None,
            "train_seconds": round(state.train_seconds, 2),
            "steps_per_second": round(total / state.train_seconds, 4) if state.train_seconds else None,
            "skipped_steps": state.skipped, **self._peaks(),
            "peak_device_mb": round(peak_memory_mb(device), 1) if device.type == "cuda" else None,
            "device": str(device), "n_dev_eval": n_dev,
            "trainable_fo": sum(p.numel() for _, p in groups.fo), "trainable_zo": sum(p.numel() for _, p in groups.zo),
            **state.extra,
        }

    def _peaks(self) -> dict[str, float | None]:
        """Peak RSS of the whole process, of set-up (loading, sharding) and of training (from the end of set-up:
        evaluation and saving included), the last two when the peak could be reset between them."""
        now = round(peak_memory_mb(torch.device("cpu")), 1)
        setup = getattr(self, "_setup_peak", None)
        return {"peak_rss_mb": max(now, round(setup, 1)) if setup is not None else now,
                "setup_peak_rss_mb": round(setup, 1) if setup is not None else None,
                "train_peak_rss_mb": now if setup is not None else None}

    def _metric_results(self, state: TrainState, test: EvalResult, best: Snapshot) -> dict[str, Any]:
        """test_<metric> for each of the task's metrics, best_dev_<headline>, zero_shot_test_<metric> (None when
        no zero-shot ran): test_accuracy, best_dev_accuracy and zero_shot_test_accuracy on choice tasks."""
        head = next(iter(test.metrics))
        zero = state.extra.pop("zero_shot_metrics", None) or (
            {head: state.zero_shot} if state.zero_shot is not None and self.task.kind == "choice" else {})
        return {"metric": head, **{f"test_{k}": v for k, v in test.metrics.items()},
                f"best_dev_{head}": -best.dev_accuracy if head == "loss" else best.dev_accuracy,
                **{f"zero_shot_test_{k}": zero.get(k) for k in METRICS[self.task.kind]}}

    def restore(self, best: Snapshot, direct, method: Method, model: nn.Module) -> None:
        """Put the model in its best-dev state: load the direct weights, rebuild the base from the nearest
        snapshot and the log."""
        load_direct(self.run_dir.path / best.weights, direct)
        if not self.config.zo_on_base or method.engine is None:
            return
        _, updates = ZOLog.read(self.run_dir.zo_log)
        if best.zo_updates == len(updates):
            return
        self._rebuild_base(method.engine, updates, best.zo_updates, model, f"the best-dev step {best.step}")

    def _rebuild_base(self, engine: Engine, updates: list[ZOUpdate], index: int, model: nn.Module,
                      what: str, fresh: bool = False) -> None:
        """``fresh``: the model holds the original weights (just loaded), so index 0 needs no reading."""
        names = [canonical_name(n) for n, _ in engine.params]
        original = None if fresh else lambda: original_weights(self.config, model, names)
        replayed = rebuild(engine, self.snapshots, updates, index, original)
        self.log(f"rebuilt the base model at {what}: snapshot {index - replayed} + {replayed} logged updates")

    def _auto_lr(self, model: nn.Module, groups: ParamGroups, objective: Objective, train: list) -> None:
        """``--auto-lr``: probe the starting weights, take its suggestions, and write them to the run's config
        (so that resume, replay and the results name the rates that were used) and to ``probe.json``."""
        from hyft.training.probe import apply, probe_run

        result = probe_run(self.config, model, groups, objective, train)
        self.log(result.describe())
        self.log(f"--auto-lr: {', '.join(apply(self.config, result)) or 'nothing measurable; defaults kept'}")
        self.config.validate().to_yaml(self.run_dir.config)
        self.run_dir.probe.write_text(json.dumps(result.to_dict(), indent=2) + "\n")

    def _zo_mask(self, model, tokenizer, groups: ParamGroups, train: list) -> Path:
        """The sparse-ZO mask: chosen by rank 0 alone on its whole model (sensitivity: on the first
        ``mask_batches`` training batches) and written to the run directory before the first step, where every
        rank (and a resumed run) reads it."""
        c, path = self.config, self.run_dir.mask
        objective = Objective(model, tokenizer, c)  # rank 0's own loss: no collective

        def loss(b: int) -> torch.Tensor:
            examples = [train[(b * c.batch_size + j) % len(train)] for j in range(c.batch_size)]
            objective.model.train()
            return objective(objective.encode(examples))

        def choose() -> None:
            mask = masks.build(c.zo_mask, groups.zo, c.zo_density, loss, c.mask_batches)
            masks.save(path, groups.zo, mask)
            self.log(f"ZO mask ({c.zo_mask}, density {c.zo_density:g}): {sum(m.numel() for m in mask):,} of "
                     f"{sum(p.numel() for _, p in groups.zo):,} weights")

        if not self.resume:
            self.on_main(choose)
        return path

    def _write_best(self, step: int, direct) -> str:
        """The best-dev direct weights in their own file (not in memory, not in every checkpoint)."""
        name = RunDir.best_name(step)
        tensors = self._gathered(direct) if self.sharded or self.comm.is_main else {}  # sharded: every rank gathers
        if not self.comm.is_main:
            return name
        tmp = self.run_dir.path / f".{name}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, self.run_dir.path / name)
        return name

    @staticmethod
    def _gathered(direct) -> dict[str, torch.Tensor]:
        """The direct weights, whole, on the CPU (sharded: gathered one tensor at a time, a collective)."""
        return {n: shards.full(p.detach()).to("cpu").contiguous() for n, p in direct}

    def _prune(self, state: TrainState) -> None:
        """After a checkpoint: drop best-dev files and base snapshots that neither it nor the run needs."""
        keep = state.best.weights if state.best else None
        for f in self.run_dir.path.glob(RunDir.BEST_GLOB):
            if f.name != keep:
                f.unlink(missing_ok=True)
        for d in self.run_dir.path.glob(RunDir.SHARDED_GLOB):  # older sharded checkpoints
            if d.name != RunDir.sharded_name(state.step):
                shutil.rmtree(d, ignore_errors=True)
        if self.config.zo_on_base:
            self.snapshots.prune([state.zo_updates] + ([state.best.zo_updates] if state.best else []))

    # --- metrics and checkpoints -----------------------------------------------------------------
    def _log_metrics(self, state: TrainState, row: dict[str, Any]) -> None:
        state.metrics_lines += 1
        if self.comm.is_main:
            self.run_dir.log_metrics(row)
            self.reporter.log(row)

    def _save_checkpoint(self, state: TrainState, method: Method, sampler: EpochSampler, direct) -> None:
        """Write ``checkpoint.pt`` atomically (rank 0; every rank holds the same state but its own RNG streams;
        a failed write fails every rank)."""
        rng = checkpoint.rng_states(self.comm, self.device)
        shards_dir = RunDir.sharded_name(state.step) if self.sharded else None
        if shards_dir is not None:  # every rank writes its shards of φ (fo-full: of every weight) and the optimizer
            with self.comm.around("the sharded checkpoint"):
                sharding.save(self.run_dir.path / shards_dir, method.model, direct, method.optimizer)

        # a ZO group no base snapshot holds (zo-peft) keeps its residuals here, whole (sharded: every rank gathers)
        residuals = method.engine.whole_residuals() if method.engine is not None and not self.config.zo_on_base \
            else None

        def write() -> None:
            zo = checkpoint.zo_state(method, state.zo_updates, residuals)
            if shards_dir is not None:
                zo["method"]["optimizer"] = None  # in the sharded folder
            payload = {
                "config": self.config.to_dict(),
                "state": state,
                "sampler": sampler.state_dict(),
                "direct": None if shards_dir else {name: p.detach().to("cpu", copy=True) for name, p in direct},
                "sharded": shards_dir,
                **zo,
                **rng,
            }
            checkpoint.write_atomic(self.run_dir.checkpoint, payload)
            self._prune(state)

        self.on_main(write)

    def _read_checkpoint(self) -> dict[str, Any] | None:
        path = self.run_dir.checkpoint
        if not self.comm.broadcast_object(path.is_file()):  # rank 0 decides, before it writes anything
            self.log(f"no checkpoint in {self.run_dir.path}: starting the run from the beginning")
            if self.comm.is_main:
                for stale in (self.run_dir.metrics, self.run_dir.zo_log):
                    stale.unlink(missing_ok=True)
            return None
        return checkpoint.read(path)

    def _resume_from(self, ckpt: dict[str, Any], method: Method, sampler: EpochSampler, direct,
                     model: nn.Module) -> TrainState:
        stored = ckpt.get("config")
        changes = "no config in checkpoint" if stored is None else config_changes(stored, self.config)
        if changes:
            raise HyftError(f"cannot resume {self.run_dir.path}: its config differs from the checkpoint's ({changes}); "
                            "start a new run with --out instead")
        state: TrainState = ckpt["state"]
        checkpoint.restore_zo_state(method, ckpt)
        sampler.load_state_dict(ckpt["sampler"])
        if ckpt.get("sharded"):  # written by any number of processes
            sharding.load(self.run_dir.path / ckpt["sharded"], method.model, direct, method.optimizer)
        else:
            with torch.no_grad():
                for name, p in direct:
                    shards.copy_from_full_(p, ckpt["direct"][name])
        # rows and updates written after this checkpoint belong to steps that will be run again
        if self.comm.is_main:
            self.run_dir.truncate_jsonl(self.run_dir.metrics, state.metrics_lines)
            if method.engine is not None:
                self.run_dir.truncate_jsonl(self.run_dir.zo_log, 1 + state.zo_updates)
        self.comm.barrier()
        if method.engine is not None:
            try:
                header, updates = ZOLog.read(self.run_dir.zo_log)
            except ValueError as err:
                raise HyftError(f"cannot resume {self.run_dir.path}: {err}") from err
            if len(updates) < state.zo_updates:  # a partial copy: rebuilding from it would give another base
                raise HyftError(f"cannot resume {self.run_dir.path}: its ZO log holds {len(updates)} updates, the "
                                f"checkpoint counts {state.zo_updates}; the run directory is incomplete")
            check_device(header, next(model.parameters()).device, self.log)
            if self.config.zo_on_base and state.zo_updates:
                self._rebuild_base(method.engine, updates, state.zo_updates, model, f"step {state.step}", fresh=True)
        checkpoint.restore_rng(ckpt, self.comm, self.device,
                               reseed=derive_seed(self.config.seed, "dropout-resharded", self.comm.rank, state.step))
        return state

    def _catch_signals(self) -> dict[int, Any]:
        """SIGINT/SIGTERM finish the current step, save a checkpoint and stop (main thread only)."""
        def request_stop(signum: int, _frame: object) -> None:
            self._stop = signum

        handlers = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread: no handlers, the caller manages interruption
            pass
        return handlers

    @staticmethod
    def _restore_signals(handlers: dict[int, Any]) -> None:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def direct_params(config: RunConfig, groups: ParamGroups) -> list[tuple[str, nn.Parameter]]:
    """Weights that the ZO log cannot rebuild, so snapshots and checkpoints must store them."""
    return groups.fo + (groups.zo if not config.zo_on_base else [])


def config_changes(stored: dict[str, Any], config: RunConfig) -> str:
    """``key: old -> new`` for every value of ``config`` that differs from ``stored`` ('' when none). A key
    missing from ``stored`` (saved before hyft had it) counts as its default: hyft adds a key only with a
    default that keeps the old behaviour."""
    was = {**RunConfig().to_dict(), **stored}
    return ", ".join(f"{k}: {v!r} -> {getattr(config, k, None)!r}" for k, v in was.items()
                     if getattr(config, k, None) != v)


def load_direct(path: Path, direct) -> None:
    """Copy the weights saved by ``_write_best`` into the direct parameters."""
    if not path.is_file():
        raise HyftError(f"the best-dev weights {path} are missing; the run directory is incomplete")
    with torch.no_grad(), safe_open(str(path), "pt", device="cpu") as f:
        for name, p in direct:
            shards.copy_from_full_(p, f.get_tensor(name))


def original_weights(config: RunConfig, model: nn.Module, names: list[str]) -> Lookup:
    """The original model's tensors by canonical name: read from its safetensors files one tensor at a time,
    or (a hub model without local files, or keys renamed on load) from a loaded copy."""
    lookup = original_lookup(model_dir(config.model), model, resolve_dtype(config.dtype), names)
    if lookup is not None:
        return lookup
    original, _ = load_model(config.model, config.dtype)
    tensors = {canonical_name(n): p.detach() for n, p in original.named_parameters()}
    return tensors.get


def train(config: RunConfig, out: str | Path, overwrite: bool = False, progress: bool = True,
          resume: bool = False) -> dict[str, Any]:
    """Library entry point: run (or resume) one training job and return its results."""
    return Trainer(config, out, overwrite, progress, resume).run()
