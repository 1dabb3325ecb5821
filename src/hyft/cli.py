"""The ``hyft`` command line: thin wrappers that parse flags and call the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hyft.config import RunConfig
from hyft.errors import HyftError
from hyft.precision import AUTOCAST
from hyft.rundir import RunDir

Command = Callable[[argparse.Namespace], int]
CONFIG_KEYS = set(RunConfig.__dataclass_fields__)


def cmd_tasks(args: argparse.Namespace) -> int:
    from hyft.tasks import TASKS, sample_splits

    for name, cls in TASKS.items():
        task = cls()
        splits = sample_splits(task, seed=args.seed)
        sizes = f"train={len(splits.train):<5} dev={len(splits.dev):<4} test={len(splits.test):<5}"
        print(f"{name:<11} {sizes} {task.description}")
        for note in splits.notes:
            print(f"{'':11} note: {note}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from hyft.models import load_model
    from hyft.tasks import get_task, sample_splits
    from hyft.tasks.evaluate import evaluate_task

    if args.batch_size <= 0 or args.num_test <= 0 or (args.num_eval is not None and args.num_eval <= 0):
        raise HyftError("--batch-size, --num-test and --num-eval must be positive")
    task = get_task(args.task)
    splits = sample_splits(task, seed=args.seed, num_test=args.num_test)
    for note in splits.notes:
        print(f"note: {note}", file=sys.stderr)
    examples = splits.get(args.split)[: args.num_eval]
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    result = evaluate_task(model, tokenizer, task, examples, batch_size=args.batch_size, normalize=args.normalize,
                           max_length=args.max_length, desc=f"{args.task}/{args.split}", precision=args.autocast)
    print(
        f"{args.task} {args.split}: {result.describe()} (n={result.n}, "
        f"{result.examples_per_second:.1f} examples/s, {result.seconds:.1f}s)"
    )
    if args.json:
        record = {
            "task": args.task, "model": args.model, "split": args.split, "n": result.n, **result.metrics,
            "seconds": round(result.seconds, 3), "seed": args.seed, "normalize": args.normalize, "dtype": args.dtype,
            "autocast": args.autocast,
            "max_length": args.max_length,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from hyft.training.loop import train

    if args.resume and (args.config or args.out or args.overwrite):
        raise HyftError("--resume takes the run's own config.yaml; drop --config/--out/--overwrite")
    source = args.config or (str(RunDir(Path(args.resume)).config) if args.resume else None)
    if args.resume and not Path(source).is_file():
        raise HyftError(f"{args.resume} is not a run directory (no config.yaml)")
    values = RunConfig.from_yaml(source).to_dict() if source else {}
    values.update({k: v for k, v in vars(args).items() if k in CONFIG_KEYS})
    config = RunConfig.from_dict(values, source="flags")
    out = args.resume or args.out or f"runs/{config.task}-{config.method}-s{config.seed}"
    results = train(config, out, overwrite=args.overwrite, progress=not args.no_progress,
                    resume=bool(args.resume))
    if int(os.environ.get("RANK", "0")) != 0:  # data parallel: rank 0 reports
        return 0
    from hyft.tools.plot import plot_run

    plot_run(Path(out))  # the run's curves (plots/*.png), beside its metrics
    head = results.get("metric", "accuracy")  # the task's headline metric
    zero_shot = results.get(f"zero_shot_test_{head}")
    if zero_shot is not None:
        print(f"zero-shot test {head}: {zero_shot:.4f}")
    print(f"fine-tuned test {head}: {results[f'test_{head}']:.4f} ({results['method']}, {results['task']}, "
          f"{results['steps']} steps, {results['train_seconds']:.0f}s training, "
          f"peak RSS {results['peak_rss_mb']:.0f} MB)")
    print(f"run directory: {out}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from hyft.methods import Objective
    from hyft.methods.params import prepare
    from hyft.models import load_model
    from hyft.tasks import get_task, sample_splits
    from hyft.training.loop import resolve_device
    from hyft.training.probe import probe_run

    if args.batches < 1 or args.directions < 1:
        raise HyftError(f"--batches and --directions must be >= 1, got {args.batches} and {args.directions}")
    values = RunConfig.from_yaml(args.config).to_dict() if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k in CONFIG_KEYS})
    config = RunConfig.from_dict(values, source="flags")
    splits = sample_splits(get_task(config.task), config.seed, config.num_train, config.num_dev, config.num_test)
    model, tokenizer = load_model(config.model, config.dtype, resolve_device(config.device))
    model, groups = prepare(model, config)
    result = probe_run(config, model, groups, Objective(model, tokenizer, config), splits.train, args.batches,
                       args.directions)
    print(result.describe())
    suggested = {k: getattr(result, k) for k in ("lr_zo", "lr_fo", "eps") if getattr(result, k) is not None}
    print("suggested: " + " ".join(f"--{k.replace('_', '-')} {v:.3g}" for k, v in suggested.items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from hyft.tools.replay import replay

    replay(args.model, args.log, args.out, upto=args.upto, dtype=args.dtype, device=args.device,
           snapshots=args.snapshots)
    print(f"replayed {args.log} onto {args.model}; saved to {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from hyft.tools.export import export

    out = export(args.run, args.out, merge=args.merge)
    print(f"exported {args.run} to {out}" + (" (merged)" if args.merge else ""))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from hyft.tools.plot import plot_runs

    runs = [Path(r) for r in args.runs]
    for run in runs:
        if not RunDir(run).metrics.is_file():
            raise HyftError(f"{run} is not a run directory (no metrics.jsonl)")
    print(plot_runs(runs, Path(args.out)))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from hyft.tools.bench import ROWS, run_bench

    unknown = [r for r in args.rows or [] if r not in ROWS]
    if unknown:
        raise HyftError(f"unknown benchmark row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    results = run_bench(args.model, args.batch_size, args.seq_len, args.rows, args.repeats, args.warmup,
                        args.dtype, args.device, memory=not args.no_memory, out=args.out, sweeps=args.sweeps,
                        launches=args.launches, autocast=args.autocast)
    from hyft.tools.bench.report import markdown

    print(markdown(results))
    return 0


def _config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field; unset flags keep the YAML's (or the default) value."""
    from dataclasses import fields

    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict = {"default": argparse.SUPPRESS, "help": f.metadata.get("help"), "dest": f.name}
        kind = str(f.type)
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind.startswith("list"):
            kwargs["nargs"] = "+"
        elif kind.startswith("int"):
            kwargs["type"] = int
        elif kind.startswith("float"):
            kwargs["type"] = float
        parser.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyft", description="Hybrid ZO/FO fine-tuning of language models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _training_commands(sub)
    _tool_commands(sub)
    return parser


def _training_commands(sub: Any) -> None:
    """tasks, eval, train, probe: what a run needs."""
    from hyft.models import DEFAULT_MODEL

    p = sub.add_parser("tasks", help="list the built-in tasks and their split sizes")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("eval", help="zero-shot (or any checkpoint's) accuracy on a task")
    p.add_argument("--model", default=DEFAULT_MODEL, help="packaged name, Hugging Face id or local directory")
    p.add_argument("--task", default="sst2")
    p.add_argument("--split", default="test", choices=["test", "dev", "train"])
    p.add_argument("--num-eval", type=int, default=None, help="evaluate only the first N examples")
    p.add_argument("--num-test", type=int, default=1000, help="test examples sampled, as in hyft train")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="seed of the MeZO-style split sampling")
    p.add_argument("--normalize", default="mean", choices=["mean", "sum"], help="candidate score")
    p.add_argument("--max-length", type=int, default=512, help="prompt tokens kept (long contexts lose their start)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--autocast", default="none", choices=list(AUTOCAST),
                   help="mixed precision: forwards in bfloat16 over the --dtype weights (as hyft train's)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="fine-tune with hybrid or a baseline method")
    p.add_argument("--config", default=None, help="YAML config (a run's config.yaml reruns it); flags override")
    p.add_argument("--out", default=None, help="run directory (default runs/<task>-<method>-s<seed>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("probe", help="measure each group's curvature on a few batches and suggest lr_zo, "
                                     "lr_fo and eps (what --auto-lr uses)")
    p.add_argument("--config", default=None, help="YAML config; flags override")
    p.add_argument("--batches", type=int, default=4, help="training batches to average over")
    p.add_argument("--directions", type=int, default=4, help="ZO directions per batch")
    p.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    _config_flags(p)
    p.set_defaults(func=cmd_probe)


def _tool_commands(sub: Any) -> None:
    """replay, export, bench, plot: the tools over finished runs and the engine."""
    from hyft.models import DEFAULT_MODEL

    p = sub.add_parser("replay", help="rebuild a fine-tuned base model from the original and a ZO log")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the original model the run started from")
    p.add_argument("--log", required=True, help="RUN/zo_log.jsonl")
    p.add_argument("--out", required=True, help="directory for the rebuilt model")
    p.add_argument("--upto", type=int, default=None, help="apply only the first N updates (e.g. the best-dev index)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="must be the run's dtype (the default)")
    p.add_argument("--device", default="cpu", help="where to replay (cpu, cuda); logs replay on any device")
    p.add_argument("--snapshots", default=None,
                   help="base snapshots to start from (default: snapshots/ beside the log, when present)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("export", help="a finished run as a Hugging Face model dir (or base + PEFT adapter)")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", required=True)
    p.add_argument("--merge", action="store_true", help="fold the LoRA weights into the base: one plain model")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="step time (split into forward/backward/perturb/update) and peak memory "
                                     "of every method, beside the MeZO algorithm")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rows", nargs="*", default=None, help="subset of rows (default: all; none: only the extras)")
    p.add_argument("--sweeps", action="store_true", help="also time one RNG sweep of the model's weights")
    p.add_argument("--launches", action="store_true",
                   help="also count the engine's kernel launches per step for a 7B Llama on an accelerator")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds (medians are reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--autocast", default="none", choices=list(AUTOCAST),
                   help="every row's forwards in bfloat16 over float32 weights (hyft train --autocast)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-memory", action="store_true", help="skip the per-row peak-memory subprocesses")
    p.add_argument("--out", default="runs/bench", help="directory for bench.json, bench.md and split.png")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plot", help="compare several runs: loss and dev accuracy against step")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default="runs/compare.png")
    p.set_defaults(func=cmd_plot)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _peers() -> int:
    """The size of this process's torch.distributed group (1 when there is none)."""
    dist = sys.modules.get("torch.distributed")
    return dist.get_world_size() if dist is not None and dist.is_available() and dist.is_initialized() else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except HyftError as err:
        code = getattr(err, "exit_code", 2)
        if args.debug:
            traceback.print_exc()
        print(f"hyft: {'error: ' if code == 2 else ''}{err}", file=sys.stderr)
        if getattr(err, "group_broken", False) and _peers() > 1:
            # a process group whose peer died cannot be torn down: gloo's and NCCL's threads may call
            # std::terminate while the interpreter exits (SIGABRT instead of this exit status), so leave now;
            # the run directory is closed and its last checkpoint written
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    except KeyboardInterrupt:
        print("hyft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
