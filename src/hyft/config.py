"""RunConfig: every knob of a training run, validated once, round-tripped through YAML and CLI flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from hyft.engine.factory import Engine, describe
from hyft.engine.zoconfig import ZOConfig
from hyft.errors import HyftError
from hyft.files import read_mapping
from hyft.methods import METHODS, MethodSpec
from hyft.methods.params import peft_config
from hyft.precision import AUTOCAST
from hyft.seeds import derive_seed


def methods() -> dict[str, MethodSpec]:
    """The method registry (config sits above the methods: it validates against every registry)."""
    return METHODS


def task_kind(name: str) -> str:
    """choice, lm or generate (see :class:`hyft.tasks.base.Task`); an unknown task is the task layer's error."""
    from hyft.tasks import get_task

    return get_task(name).kind


def _type_ok(kind: str, value: Any) -> bool:
    """Does ``value`` fit a field annotated ``kind`` (int, float, str, bool, list[str], optionally | None)?"""
    if value is None:
        return kind.endswith("| None")
    base = kind.removesuffix(" | None")
    if base == "bool":
        return isinstance(value, bool)
    if base == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if base == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if base == "str":
        return isinstance(value, str)
    if base == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return False


SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class RunConfig:
    """A training run. Field docs double as the CLI help (``hyft train --help``)."""

    # what to train
    model: str = field(default="smollm2-135m", metadata={"help": "packaged name, Hugging Face id or local dir"})
    task: str = field(default="sst2", metadata={"help": "built-in task name"})
    method: str = field(default="hybrid", metadata={"help": "update rule: hybrid, fo-peft, fo-full, zo-full, zo-peft "
                                                                 "(hyft.methods.METHODS)"})
    seed: int = field(default=0, metadata={"help": "root seed: data sampling, order, ZO directions"})
    dtype: str = field(default="float32", metadata={"help": "weights dtype: float32, bfloat16 or float16"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto (cuda when present)"})
    autocast: str = field(default="none", metadata={
        "help": "mixed precision: none or bfloat16 forwards (torch.autocast, as transformers' --bf16) over "
                "float32 weights, gradients and updates; every training and evaluation forward"})
    # data and budget
    num_train: int = field(default=1000, metadata={"help": "training examples sampled (MeZO protocol)"})
    num_dev: int = field(default=500, metadata={"help": "dev examples sampled from the training file"})
    num_test: int = field(default=1000, metadata={"help": "test examples, at most, from the validation file"})
    steps: int = field(default=200, metadata={"help": "training steps (minibatches)"})
    epochs: float | None = field(default=None, metadata={"help": "if set, the budget in epochs (overrides steps)"})
    batch_size: int = field(default=16, metadata={"help": "examples per step"})
    micro_batch_size: int | None = field(
        default=None, metadata={"help": "training steps evaluate each batch as length-sorted pieces of this many "
                                        "examples: the same loss and update up to rounding, less padding, one "
                                        "piece's activations in a backward"})
    shuffle: str = field(default="reshuffle", metadata={"help": "reshuffle (every epoch), once, or none"})
    loss: str = field(default="classification", metadata={"help": "classification (CE over candidates) or lm"})
    normalize: str = field(default="mean", metadata={"help": "candidate score: mean or sum of token log-probs"})
    max_length: int = field(default=256, metadata={"help": "tokens per sequence; contexts are cut on the left"})
    # evaluation
    eval_every: int = field(default=50, metadata={"help": "steps between dev evaluations (0: only at the end)"})
    eval_dev_examples: int | None = field(default=None, metadata={"help": "evaluate on the first N dev examples"})
    eval_batch_size: int = field(default=32, metadata={"help": "examples per evaluation batch"})
    zero_shot: bool = field(default=True, metadata={"help": "also test the model before training"})
    checkpoint_every: int = field(default=25, metadata={"help": "steps between checkpoints (0: only at the end)"})
    report_to: str = field(default="none", metadata={"help": "also send the metrics to tensorboard or wandb"})
    max_bad_steps: int = field(default=5, metadata={"help": "consecutive non-finite steps before the run stops"})
    # first-order group (phi)
    lr_fo: float = field(default=1e-3, metadata={"help": "learning rate of the FO group"})
    optimizer_fo: str = field(default="adamw", metadata={"help": "adamw or sgd"})
    momentum_fo: float = field(default=0.0, metadata={"help": "SGD momentum of the FO group"})
    weight_decay_fo: float = field(default=0.0, metadata={"help": "weight decay of the FO group"})
    max_grad_norm: float = field(default=0.0, metadata={
        "help": "clip the FO group's gradient to this total norm before its step (0: off; transformers' Trainer "
                "clips at 1.0; HybridTrainer uses TrainingArguments.max_grad_norm instead)"})
    log_grad_norm: bool = field(default=True, metadata={
        "help": "log the FO gradient's norm each step (a pass over φ's gradients: ~4 %% of a CPU fo-full step)"})
    schedule_fo: str = field(default="constant", metadata={"help": "constant, linear or cosine"})
    warmup_fo: int = field(default=0, metadata={"help": "linear warmup steps of the FO group"})
    # zeroth-order group (theta)
    lr_zo: float = field(default=1e-6, metadata={"help": "learning rate of the ZO group"})
    eps: float = field(default=1e-3, metadata={"help": "ZO perturbation size epsilon"})
    estimator: str = field(default="two-sided", metadata={"help": "two-sided or one-sided SPSA"})
    zo_dist: str = field(default="rademacher", metadata={
        "help": "directions: rademacher (±1, cheap to draw), gaussian (MeZO) or lowrank (LOZO: U Vᵀ per matrix)"})
    zo_rank: int = field(default=2, metadata={"help": "lowrank directions: the rank R of U Vᵀ"})
    zo_lazy: int = field(default=50, metadata={"help": "lowrank directions: steps V is held (updates fold then)"})
    zo_params: str | None = field(default=None, metadata={"help": "regex: ZO-train only matching base params"})
    zo_q: int = field(default=1, metadata={"help": "random directions per step, estimated at the same weights"})
    zo_combine: str = field(default="mean", metadata={"help": "how the q estimates combine: mean (q-SPSA) or "
                                                              "normalized (FZOO: divided by their spread)"})
    zo_mask: str | None = field(default=None, metadata={"help": "sparse ZO: perturb only a fixed mask of each ZO "
                                                                "tensor chosen by magnitude or sensitivity"})
    zo_density: float = field(default=0.01, metadata={"help": "sparse ZO: fraction of each tensor in the mask"})
    mask_batches: int = field(default=4, metadata={"help": "sensitivity mask: batches of squared gradients"})
    auto_lr: bool = field(default=False, metadata={"help": "set lr_fo, lr_zo and eps from `hyft probe` on the "
                                                           "first training batches before step 1"})
    fused: bool = field(default=True, metadata={"help": "two-sided, float32: perturb in place (hybrid: the backward "
                                                        "pass for the PEFT module is the SPSA point θ+εz, one forward "
                                                        "fewer; zo-*: MeZO's in-place form)"})
    weight_decay_zo: float = field(default=0.0, metadata={"help": "weight decay of the ZO group"})
    zo_compensate: bool = field(
        default=True, metadata={"help": "bf16/fp16: keep each ZO update's rounding error in a residual (one more "
                                        "weight-sized buffer) so that updates below the ulp accumulate"})
    zo_rounding: str = field(
        default="nearest", metadata={"help": "bf16: how a ZO update is rounded to the weight; stochastic: seeded "
                                             "stochastic rounding (unbiased, replayable), instead of the residual, "
                                             "so bf16 ZO needs no buffer beyond the weights"})
    shard: str = field(default="none", metadata={"help": "none, or fsdp: shard the model over the torchrun "
                                                   "processes with FSDP2 (one unit per decoder block)"})
    snapshot_every: int = field(
        default=100, metadata={"help": "ZO updates between base snapshots: resume/restore/export replay at most this"})
    schedule_zo: str = field(default="constant", metadata={"help": "constant, linear or cosine"})
    warmup_zo: int = field(default=0, metadata={"help": "linear warmup steps of the ZO group"})
    # PEFT module
    peft: str = field(default="lora", metadata={"help": "peft method, by peft's name in lower case: lora, ia3, "
                                                        "loha, lokr, prefix_tuning (prefix), prompt_tuning "
                                                        "(prompt), ..."})
    peft_config: str | None = field(default=None, metadata={"help": "YAML/JSON file of that peft config's fields "
                                                                    "(e.g. use_dora: true for DoRA)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_targets: list[str] | None = field(
        default=None, metadata={"help": "module names or all-linear (default: peft's choice, q_proj,v_proj on Llama)"}
    )

    def validate(self) -> RunConfig:
        """Raise HyftError naming the first bad value."""
        checks = [
            (self.method in methods(), f"method must be one of {', '.join(methods())}"),
            (self.steps > 0, "steps must be > 0"),
            (self.epochs is None or self.epochs > 0, "epochs must be > 0"),
            (self.batch_size > 0, "batch_size must be > 0"),
            (self.micro_batch_size is None or self.micro_batch_size > 0, "micro_batch_size must be > 0"),
            (self.eval_batch_size > 0, "eval_batch_size must be > 0"),
            (self.num_train > 0 and self.num_dev >= 0 and self.num_test > 0, "num_train/num_test must be > 0"),
            (self.eval_every >= 0, "eval_every must be >= 0"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
            (self.snapshot_every > 0, "snapshot_every must be > 0"),
            (self.max_bad_steps > 0, "max_bad_steps must be > 0"),
            (self.report_to in ("none", "tensorboard", "wandb"), "report_to must be none, tensorboard or wandb"),
            (self.lr_fo >= 0, "lr_fo must be >= 0"),
            (self.lr_zo >= 0, "lr_zo must be >= 0"),
            (self.weight_decay_fo >= 0 and self.weight_decay_zo >= 0, "weight decay must be >= 0"),
            (self.max_grad_norm >= 0, "max_grad_norm must be >= 0 (0: no clipping)"),
            (not self.max_grad_norm or self.method not in methods() or methods()[self.method].fo is not None,
             f"max_grad_norm clips the FO group's gradient; method {self.method} has no FO group"),
            (self.shard == "none" or not self.max_grad_norm, "shard fsdp does not support max_grad_norm yet (the "
             "norm of sharded gradients is untested)"),
            (self.warmup_fo >= 0 and self.warmup_zo >= 0, "warmup must be >= 0"),
            (self.schedule_fo in SCHEDULES and self.schedule_zo in SCHEDULES, f"schedule: {', '.join(SCHEDULES)}"),
            (self.optimizer_fo in ("sgd", "adamw"), "optimizer_fo must be sgd or adamw"),
            *[(False, problem) for problem in self.zo.problems()],
            (self.zo_combine != "normalized" or self.zo_q >= 2, "zo_combine normalized needs zo_q >= 2"),
            (0 < self.zo_density <= 1, "zo_density must be in (0, 1]"),
            (self.zo_rounding == "nearest" or self.dtype != "float16",
             "zo_rounding stochastic needs bfloat16 (or float32, where it changes nothing), not float16"),
            (self.zo_rounding == "nearest" or not self.zo_mask, "zo_rounding stochastic does not support zo_mask"),
            (self.zo_dist != "lowrank" or not self.zo_mask, "zo_dist lowrank does not support zo_mask"),
            (self.zo_dist != "lowrank" or self.zo_rounding == "nearest",
             "zo_dist lowrank folds with the residual: use zo_rounding nearest"),
            (self.zo_dist != "lowrank" or self.weight_decay_zo == 0,
             "zo_dist lowrank does not support weight_decay_zo (it would need a dense sweep every step)"),
            (self.mask_batches > 0, "mask_batches must be > 0"),
            (self.shard in ("none", "fsdp"), "shard must be none or fsdp"),
            (self.shard == "none" or not self.auto_lr, "shard fsdp does not support auto_lr (the probe runs on one "
             "process): run `hyft probe` first and pass its rates"),
            (self.shuffle in ("reshuffle", "once", "none"), "shuffle must be reshuffle, once or none"),
            (self.loss in ("classification", "lm"), "loss must be classification or lm"),
            (self.normalize in ("mean", "sum"), "normalize must be mean or sum"),
            (self.dtype in ("float32", "bfloat16", "float16"), "dtype must be float32, bfloat16 or float16"),
            (self.autocast in AUTOCAST, "autocast must be none or bfloat16 (float16 would need loss "
             "scaling)"),
            (self.autocast == "none" or self.dtype == "float32", "autocast computes in lower precision over "
             "float32 weights: use dtype float32 with it"),
            (self.autocast == "none" or self.shard == "none", "shard fsdp does not support autocast yet (FSDP2 "
             "casts through its MixedPrecisionPolicy, untested here)"),
            (self.autocast == "none" or not self.auto_lr, "auto_lr's ε window assumes float32 forwards: run "
             "`hyft probe` without autocast, or pass lr_fo, lr_zo and eps"),
            (self.lora_r > 0, "lora_r must be > 0"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (self.max_length > 1, "max_length must be > 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise HyftError(f"bad config value: {message}")
        if self.loss == "classification" and task_kind(self.task) != "choice":
            self.loss = "lm"  # a generative task has one gold completion: its loss is the LM loss on it
        if self.spec.uses_peft:
            peft_config(self)  # peft's own config object, built now: a bad --peft or field fails before model work
        return self

    @property
    def zo(self) -> ZOConfig:
        """The ZO half of this config: the ZO log's header, and what replay reads back."""
        return ZOConfig(eps=self.eps, dist=self.zo_dist, estimator=self.estimator, q=self.zo_q,
                        combine=self.zo_combine, mask=self.zo_mask, density=self.zo_density if self.zo_mask else None,
                        compensate=self.zo_compensate, rounding=self.zo_rounding, params=self.zo_params,
                        **({"rank": self.zo_rank, "lazy": self.zo_lazy, "root": derive_seed(self.seed, "lowrank")}
                           if self.zo_dist == "lowrank" else {}))

    def zo_header(self, engine: Engine, device: str, **extra: Any) -> dict[str, Any]:
        """The ZO log's header of this run: its :class:`ZOConfig`, and what replay checks the model against."""
        return self.zo.header(model=self.model, method=self.method, dtype=self.dtype, device=device,
                              **describe(engine), **extra)

    @property
    def spec(self) -> MethodSpec:
        """What the method trains (its registry entry)."""
        return methods()[self.method]

    @property
    def zo_on_base(self) -> bool:
        return self.spec.zo_on_base

    @property
    def uses_peft(self) -> bool:
        return self.spec.uses_peft

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> RunConfig:
        types = {f.name: str(f.type) for f in fields(cls)}
        unknown = sorted(set(data) - set(types))
        if unknown:
            raise HyftError(f"{source}: unknown key(s) {', '.join(unknown)}")
        for key, value in data.items():
            if not _type_ok(types[key], value):
                raise HyftError(f"{source}: {key} must be {types[key]}, got {value!r}")
        return cls(**data).validate()

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        data = read_mapping(path, "config", "expected a mapping of config keys")
        return cls.from_dict(data, source=str(path))
